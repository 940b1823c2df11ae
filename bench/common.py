"""Shared pieces of the benchmark scripts: thread pinning, machine facts, the random
InternVL2-1B-shaped checkpoint, an RSS sampler and the JSON writer.

Import this module before numpy or torch: `pin_threads` must set the BLAS thread
variables before either library starts its thread pool.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pin_threads(threads: int) -> None:
    """Give numpy's BLAS and torch the same number of threads (call before importing them)."""
    if "numpy" in sys.modules or "torch" in sys.modules:
        # Too late for the environment variables: the pools are already sized.
        raise RuntimeError("pin_threads must run before numpy/torch are imported")
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)


@dataclass(frozen=True)
class Dims:
    """The shape of the random checkpoint (InternVL2-1B at 224 by default)."""

    image_size: int = 224
    patch: int = 14
    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_intermediate: int = 4096
    text_hidden: int = 896
    text_layers: int = 24
    text_heads: int = 14
    text_kv_heads: int = 2
    text_intermediate: int = 4864
    vocab: int = 151655

    @classmethod
    def tiny(cls) -> "Dims":
        """Miniature dims with the real vocabulary and image grid, for smoke runs."""
        return cls(vision_hidden=32, vision_layers=2, vision_heads=4, vision_intermediate=64,
                   text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=128)


REAL_DIMS = Dims()


def machine_info(threads: int | None) -> dict:
    """Facts that make a figure reproducible: CPU, cores, BLAS, library versions, load, date."""
    import numpy as np
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas_name = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001 - older numpy: report what we know
        blas_name = "unknown"
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "threads": threads,
        "numpy": np.__version__,
        "numpy_blas": blas_name,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "command": " ".join(["python", _script_path(), *sys.argv[1:]]),
    }


def _script_path() -> str:
    """The running script relative to the repository (bench/x.py), as a user would type it."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None:
        return "python"
    try:
        return str(script.relative_to(REPO))
    except ValueError:
        return script.name


def build_checkpoint(directory: Path, dims: Dims, seed: int = 0):
    """Write a random bf16 InternVLForConditionalGeneration checkpoint with the InternVL2-1B
    tokenizer to `directory`; return the float32 eager torch model holding the same values."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    sys.path.insert(0, str(REPO))  # tests/ holds the offline tokenizer assembly
    from tests.tokenizer_files import INTERNVL2_ADDED_TOKENS, write_internvl2_tokenizer

    grid = dims.image_size // dims.patch
    vision = dict(hidden_size=dims.vision_hidden, num_hidden_layers=dims.vision_layers,
                  num_attention_heads=dims.vision_heads, intermediate_size=dims.vision_intermediate,
                  image_size=dims.image_size, patch_size=dims.patch, attention_bias=True,
                  norm_type="layer_norm", layer_norm_eps=1e-6, hidden_act="gelu", use_mean_pooling=True)
    text = dict(model_type="qwen2", hidden_size=dims.text_hidden, num_hidden_layers=dims.text_layers,
                num_attention_heads=dims.text_heads, num_key_value_heads=dims.text_kv_heads,
                intermediate_size=dims.text_intermediate, vocab_size=dims.vocab, rms_norm_eps=1e-6,
                max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True)
    config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5,
                            image_token_id=INTERNVL2_ADDED_TOKENS["<IMG_CONTEXT>"],
                            image_seq_length=grid * grid // 4, vision_feature_layer=-1, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    # Round through bf16 in place (no second copy of ~1 B parameters): the float32 model
    # then holds exactly the checkpoint's values, so both backends run the same weights.
    model.to(torch.bfloat16)
    model.save_pretrained(directory)
    model.to(torch.float32).eval()
    config_path = Path(directory) / "config.json"
    saved = json.loads(config_path.read_text())
    saved["template"] = "Hermes-2"
    config_path.write_text(json.dumps(saved, indent=2))
    write_internvl2_tokenizer(Path(directory))
    return model


def build_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Write a `Dims.tiny()` checkpoint (real vocabulary and image grid) to `directory` and
    return it: what scripts run without --model use.

    Default initialisation leaves norms at 1, biases at 0 and tiny tied embeddings, so
    the argmax merely echoes the input token; every tensor is therefore refilled with
    seeded values of a useful scale, which makes precision effects visible. No torch model
    is returned: `build_checkpoint`'s would no longer hold the refilled values.
    """
    directory = Path(directory)
    build_checkpoint(directory, Dims.tiny(), seed)
    _refill_weights(directory, seed)
    return directory


def _refill_weights(directory: Path, seed: int) -> None:
    """Rewrite every safetensors file in `directory` with seeded bf16 values: norms near 1,
    small biases, embeddings of std 0.25, matrices scaled by 1/sqrt(fan_in)."""
    import math

    import torch
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    for path in sorted(directory.glob("*.safetensors")):
        tensors = load_file(path)
        for name in sorted(tensors):
            shape = tuple(tensors[name].shape)
            noise = torch.randn(shape, generator=generator)  # float32, the tensor's shape
            if name.endswith("bias"):
                value = 0.1 * noise
            elif len(shape) == 1:  # layer scales and norm weights
                value = 1.0 + 0.2 * noise
            elif "embed" in name or name.endswith("cls_token"):
                value = 0.25 * noise
            else:
                value = noise / math.sqrt(math.prod(shape[1:]))
            tensors[name] = value.to(torch.bfloat16)
        save_file(tensors, path, metadata={"format": "pt"})


def random_image(seed: int = 0, size: int = 224):
    """A deterministic uint8 RGB [size, size, 3] image with gradients and noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 255 / (size - 1), yy * 255 / (size - 1), (xx + yy) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 41, size=(size, size, 3)), 0, 255).astype(np.uint8)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRss:
    """Samples this process's RSS every `interval_s` on a thread while the block runs.

    `peak` is the highest RSS seen, `grew` the peak minus the RSS when the block began
    (what one run adds on top of the loaded models)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def grew(self) -> int:
        return self.peak - self.start


def median(values):
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def run_on_checkpoint(args, name: str, measure, table) -> int:
    """The shared main of the model benchmarks: threads, a scratch checkpoint, table, JSON.

    `measure(args, checkpoint, dims)` returns the result dict; exported embeddings go to the
    scratch directory, never the user's cache.
    """
    import tempfile

    pin_threads(args.threads)
    dims = Dims.tiny() if args.tiny else REAL_DIMS
    with tempfile.TemporaryDirectory(prefix="vlmd-bench-") as scratch:
        os.environ["VLMD_CACHE_DIR"] = str(Path(scratch) / "cache")
        checkpoint = args.checkpoint or args.keep or Path(scratch) / "checkpoint"
        result = measure(args, checkpoint, dims)
    print(table(result))
    print(f"wrote {write_result(name + ('_tiny' if args.tiny else ''), result, args.out)}")
    return 0


def write_result(name: str, result: dict, out: Path | None) -> Path:
    """Write `result` as JSON to `out` (default bench/results/<name>.json) and return the path."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value):
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def now() -> float:
    return time.perf_counter()


__all__ = ["Dims", "REAL_DIMS", "PeakRss", "build_checkpoint", "machine_info", "median", "now",
           "pin_threads", "random_image", "rss_bytes", "write_result"]
