"""`vlmd check`: is a compiled model faithful to its checkpoint?

Runs the model under test (`--model`, usually a board directory on axengine) and the
reference graphs of the Hugging Face checkpoint (`--reference`, built with the same KV
capacity, prefill chunk and history groups as the model's graphs) on the same inputs:

- embeddings of the prompt ids and vision features: cosine and max abs error;
- every decoder layer on the first prefill chunk, teacher-forced (both sides get the
  reference's input to that layer, so each layer's own error shows, not the sum):
  cosine and max abs error of its output and of its K/V rows;
- post: each side runs its own chain; logits of the last prompt row compared, and
  next-token top-1 agreement and top-5 overlap over every prompt position of the chunk;
- a short greedy answer from each engine, side by side, with the first divergence.

Exit 0 when the verdict is faithful (top-1 agreement and final logits cosine at or
above the thresholds), 1 when not, 2 when the models could not be loaded or compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

HELP = "compare a compiled model with its Hugging Face checkpoint graph by graph (cosine, max error, top-k, answers)"
DEFAULT_PROMPT = "Describe the image in detail."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="BOARD_DIR", required=True, help="model under test (compiled directory)")
    parser.add_argument("--reference", metavar="HF_DIR", required=True, help="the Hugging Face checkpoint it came from")
    parser.add_argument("--image", metavar="FILE", help="JPEG/PNG for the vision graph (default: a synthetic image)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="question used for every comparison")
    parser.add_argument("--max-tokens", type=int, default=24, help="greedy answer length on each side")
    parser.add_argument("--backend", choices=("auto", "reference", "axengine"), default="auto",
                        help="backend of --model (auto: axengine for compiled directories)")
    parser.add_argument("--model-precision", choices=("bf16", "fp32"), default="bf16",
                        help="precision of --model when it is itself a checkpoint (reference backend)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="fp32", help="precision of the reference")
    parser.add_argument("--kv-capacity", type=int, default=1023, help="KV rows when --model is itself a checkpoint")
    parser.add_argument("--prefill-chunk", type=int, default=128, help="prefill rows when --model is a checkpoint")
    parser.add_argument("--provider", default="auto", help="axengine provider: auto, axengine, axclrt")
    parser.add_argument("--min-top1", type=float, default=0.9, help="faithful needs this top-1 agreement (0..1)")
    parser.add_argument("--min-cosine", type=float, default=0.99, help="faithful needs this final logits cosine")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Cosine similarity and max abs error of two same-shaped arrays (any float dtype)."""
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(x) * np.linalg.norm(y)
    cosine = float(x @ y / norm) if norm > 0 else float(np.array_equal(x, y))
    return {"cosine": round(cosine, 6), "max_abs": float(np.max(np.abs(x - y))) if x.size else 0.0}


def _feed(session: Any, group: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`arrays` cast to the session's input dtypes (the two sides may differ: bf16 vs float32)."""
    return {spec.name: np.ascontiguousarray(arrays[spec.name], dtype=spec.dtype) for spec in session.inputs(group)}


def _first_chunk_inputs(layer: Any, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Group 1 inputs for `rows` ([n, hidden] float32, n <= chunk): padded input, causal mask, zero K/V."""
    from npu.session import MASK_BLOCKED

    specs = {spec.name: spec for spec in layer.inputs(1)}
    chunk = specs["input"].shape[1]
    padded = np.zeros(specs["input"].shape, np.float32)  # (1, chunk, hidden)
    padded[0, : len(rows)] = rows
    mask = np.triu(np.full((chunk, chunk), MASK_BLOCKED, np.float32), k=1)[None]  # (1, chunk, chunk)
    zeros = {name: np.zeros(specs[name].shape, np.float32) for name in ("K_cache", "V_cache")}  # dummy K/V
    return {**zeros, "indices": np.arange(chunk, dtype=np.uint32)[None], "input": padded, "mask": mask}


def _layer_outputs(layer: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [spec.name for spec in layer.outputs(1)]
    return dict(zip(names, layer.run(_feed(layer, 1, inputs), 1)))


def _prompt_rows(model: Any, ids: list[int], features: np.ndarray | None) -> np.ndarray:
    """[n, hidden] float32 embeddings of `ids` with the image features over the <IMG_CONTEXT> rows."""
    hidden = model.shapes().hidden
    rows = np.zeros((len(ids), hidden), np.float32)  # (n, hidden)
    model.embeddings.lookup(np.asarray(ids, np.int64), rows)
    if features is not None:
        context = np.flatnonzero(np.asarray(ids) == model.template.image_context_id)
        rows[context] = np.asarray(features, np.float32).reshape(-1, hidden)[: len(context)]
    return rows


def _post_top(model: Any, row: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(top-5 ids, logits or None on top-k builds) of the post graph for one hidden row."""
    shapes = model.shapes()
    post_in = model.post.inputs(0)[0]
    feed = {post_in.name: np.ascontiguousarray(row.reshape(post_in.shape), dtype=post_in.dtype)}  # (1, 1, hidden)
    outputs = model.post.run(feed, 0)
    if shapes.topk_ids_index is not None:
        return np.asarray(outputs[shapes.topk_ids_index]).reshape(-1)[:5].astype(np.int64), None
    logits = np.asarray(outputs[shapes.logits_index], np.float32).reshape(-1)  # (vocab,)
    best = np.argpartition(-logits, 5)[:5]  # full argsort of a 150k vocab costs ~100 ms per row
    return best[np.argsort(-logits[best], kind="stable")], logits


def _vision_features(model: Any, image: np.ndarray) -> np.ndarray:
    """The model's vision features [1, tokens, hidden] (float32) for `image`, fed as its graph
    takes it (uint8 NHWC, or float32 NCHW normalised on the host)."""
    from npu.image import ImagePreprocess

    shapes = model.shapes()
    pixels = model.preprocess.prepare(image, ImagePreprocess.input_buffer(shapes.vision_layout, *shapes.vision_size))
    return np.asarray(model.vision.run({shapes.vision_input_name: pixels}, 0)[0], np.float32)


def compare_graphs(model: Any, reference: Any, question: str, image: np.ndarray | None) -> dict[str, Any]:
    """Per-graph metrics and next-token agreement on the first prefill chunk of the prompt."""
    shapes = model.shapes()
    report: dict[str, Any] = {"graphs": [], "notes": []}
    use_image = image is not None and model.vision is not None and reference.vision is not None
    n_images = 1 if use_image else 0
    text = model.template.render(question, n_images, shapes.image_tokens if use_image else 0)
    ids, ref_ids = model.tokenizer.encode(text), reference.tokenizer.encode(text)
    if ids != ref_ids:
        report["notes"].append("the two tokenizers encode the prompt differently")
    report["graphs"].append({"graph": "embeddings", **compare(_prompt_rows(model, ids, None),
                                                              _prompt_rows(reference, ids, None))})
    features = ref_features = None
    if use_image:
        features, ref_features = _vision_features(model, image), _vision_features(reference, image)
        report["graphs"].append({"graph": "vision", **compare(features, ref_features)})
    if not shapes.chunk:
        report["notes"].append("decode-only build: no prefill group to compare layer by layer")
        return report
    n = min(len(ids), shapes.chunk)
    report["rows_compared"] = n
    ref_x = _prompt_rows(reference, ids, ref_features)[:n]  # (n, hidden)
    own_x = _prompt_rows(model, ids, features)[:n]
    for i, (layer, ref_layer) in enumerate(zip(model.layers, reference.layers)):
        ref_out = _layer_outputs(ref_layer, _first_chunk_inputs(ref_layer, ref_x))
        forced = _layer_outputs(layer, _first_chunk_inputs(layer, ref_x))
        own_x = np.asarray(_layer_outputs(layer, _first_chunk_inputs(layer, own_x))["output"], np.float32)[0, :n]
        for key, label in (("output", "output"), ("K_cache_out", "K"), ("V_cache_out", "V")):
            metrics = compare(np.asarray(forced[key])[0, :n], np.asarray(ref_out[key])[0, :n])
            report["graphs"].append({"graph": f"layer{i} {label}", **metrics})
        ref_x = np.asarray(ref_out["output"], np.float32)[0, :n]
    report.update(_next_token_agreement(model, reference, own_x, ref_x))
    return report


def _next_token_agreement(model: Any, reference: Any, own_x: np.ndarray, ref_x: np.ndarray) -> dict[str, Any]:
    top1 = overlap = 0
    logits_metrics = None
    for j in range(len(own_x)):
        own_top, own_logits = _post_top(model, own_x[j])
        ref_top, ref_logits = _post_top(reference, ref_x[j])
        top1 += int(own_top[0] == ref_top[0])
        overlap += len(set(own_top.tolist()) & set(ref_top.tolist()))
        if j == len(own_x) - 1 and own_logits is not None:
            logits_metrics = compare(own_logits, ref_logits)
    n = len(own_x)
    return {"logits_last_row": logits_metrics, "top1_agreement": round(top1 / n, 4),
            "top5_overlap": round(overlap / (5 * n), 4)}


def greedy_answers(model: Any, reference: Any, question: str, image: np.ndarray | None,
                   max_tokens: int) -> dict[str, Any]:
    from npu.engine import Engine, GenerationOptions, Prompt, TokenEvent

    sides = {}
    for label, m in (("model", model), ("reference", reference)):
        images = [image] if image is not None and m.vision is not None else []
        events = list(Engine(m).generate(Prompt(question, images=images), GenerationOptions(max_tokens=max_tokens)))
        sides[label] = {"text": events[-1].text, "ids": [e.token_id for e in events if isinstance(e, TokenEvent)]}
    a, b = sides["model"]["ids"], sides["reference"]["ids"]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {**sides, "identical_prefix": same, "identical": a == b}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"model      {report['model']}", f"reference  {report['reference']}", "",
             f"{'graph':<16} {'cosine':>10} {'max abs err':>13}"]
    for row in report["graphs"]:
        lines.append(f"{row['graph']:<16} {row['cosine']:>10.6f} {row['max_abs']:>13.6g}")
    logits = report.get("logits_last_row")
    if logits:
        lines.append(f"{'logits (last)':<16} {logits['cosine']:>10.6f} {logits['max_abs']:>13.6g}")
    if "top1_agreement" in report:
        lines.append(f"\nnext token over {report['rows_compared']} prompt positions: top-1 agreement"
                     f" {report['top1_agreement']:.1%}, top-5 overlap {report['top5_overlap']:.1%}")
    answers = report["answers"]
    lines += ["", f"answer (model)     : {answers['model']['text']!r}",
              f"answer (reference) : {answers['reference']['text']!r}",
              f"identical tokens   : {answers['identical_prefix']} of {len(answers['reference']['ids'])}"]
    lines += [f"note: {note}" for note in report["notes"]]
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from daemon.commands.bench import load_image
    from npu.engine import EngineError
    from npu.model import ModelError, load_model
    from npu.session import SessionError

    try:
        model = load_model(args.model, backend=args.backend, precision=args.model_precision, provider=args.provider,
                           kv_capacity=args.kv_capacity, prefill_chunk=args.prefill_chunk)
        shapes = model.shapes()
        reference = load_model(args.reference, backend="reference", precision=args.precision,
                               kv_capacity=shapes.capacity, prefill_chunk=shapes.chunk,
                               history_lengths=sorted(shapes.history_groups))
        image = load_image(args.image, shapes.vision_size)
        report = compare_graphs(model, reference, args.prompt, image)
        report["answers"] = greedy_answers(model, reference, args.prompt, image, args.max_tokens)
    except (ModelError, SessionError, EngineError, ValueError, OSError) as exc:
        print(f"vlmd check: {exc}", file=sys.stderr)
        return 2
    logits = report.get("logits_last_row")
    faithful = (report.get("top1_agreement", 0.0) >= args.min_top1
                and (logits is None or logits["cosine"] >= args.min_cosine))
    report.update(model=str(args.model), reference=str(args.reference),
                  verdict="faithful" if faithful else "NOT faithful")
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if faithful else 1
