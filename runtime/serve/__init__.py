"""HTTP video service: ``python -m runtime.serve`` (see ``__main__``).

``store`` (SQLite job table + job folders), ``uploads`` (request checks), ``worker`` (the one GPU worker),
``app`` (FastAPI routes), ``static/index.html`` (the web page at ``/``).
"""
