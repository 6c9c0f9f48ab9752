"""HTTP video service: ``python -m runtime.serve`` (see ``__main__``).

``store`` (the job store interface and job folders; ``store_sqlite``, ``store_postgres``), ``uploads`` (request
checks), ``models`` (``--model`` specs and ``--gpus`` entries), ``supervisor`` (the worker processes),
``worker`` (the loop each worker process runs), ``janitor`` (lease expiry, retention), ``app`` (FastAPI routes),
``static/index.html`` (the web page at ``/``).
"""
