"""Golden parity of the whole generation loop (clips, motion, CFG, solver, VAE) with given embeddings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from runtime.config import DiTConfig
from runtime.golden import Case, compare
from runtime.media import load_image
from runtime.models.dit import load_dit
from runtime.models.vae import load_vae
from runtime.preprocess import load_pose_video, prepare_reference, target_size
from runtime.backends.torch_backend import TorchDiT
from runtime.sampler import S2VSampler, SampleOptions


def check(golden_dir: Path, manifest: dict, key: str = "e2e") -> list[Case]:
    spec = manifest[key]
    cfg = DiTConfig.from_dict(manifest["dit"]["config"], source=f"{golden_dir}/manifest.json[dit]")
    model = load_dit(golden_dir / spec["dit"].split()[0], dtype=torch.float32, config=cfg)
    vae_spec = manifest["vae"]
    vae = load_vae(golden_dir / spec["vae"].split()[0], latent_mean=vae_spec["mean"], latent_std=vae_spec["std"])
    io = load_file(str(golden_dir / f"{key}_io.safetensors"))

    image = load_image(golden_dir / spec["ref_image"])
    height, width = target_size(image.height, image.width, int(spec["max_area"]))
    ref = prepare_reference(image, height, width)
    nf, num_clip = int(spec["infer_frames"]), int(spec["num_clip"])
    pose = None
    if spec.get("pose_video"):
        pose = load_pose_video(golden_dir / spec["pose_video"], num_clip, nf, height, width, int(spec.get("fps", 16)))
    opts = SampleOptions(infer_frames=nf, sample_steps=int(spec["sample_steps"]), sample_shift=float(spec["sample_shift"]),
                         guide_scale=float(spec["guide_scale"]), solver=spec["sample_solver"], seed=int(spec["seed"]),
                         start_from_ref=bool(spec["start_from_ref"]), motion_frames=int(spec["motion_frames"]),
                         drop_first_motion=bool(spec["drop_first_motion"]))
    sampler = S2VSampler(TorchDiT(model), vae)
    video = sampler.sample(ref, io["context"], io["context_null"], io["audio_emb"], num_clip, opts, pose_pixels=pose)
    tol = float(spec.get("tolerance_rel_l2", 1e-3))
    cases = [compare(key, f"video {list(video.shape)}", video, io["video"], tol)]
    if list(video.shape) != list(spec.get("video_shape", video.shape)):
        cases.append(Case(key, "video_shape", np.inf, np.inf, 0.0, f"{list(video.shape)} != {spec['video_shape']}"))
    return cases
