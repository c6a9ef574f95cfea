"""The ``omnimoe`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from omnimoe.config import ConfigError, load_config
from omnimoe.runtime import finish_distributed

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="omnimoe: multimodal models from frozen unimodal ones with Mixture-of-Experts.",
)
moe_app = typer.Typer(no_args_is_help=True, help="The sparse-MoE engine.")
data_app = typer.Typer(no_args_is_help=True, help="Write and check manifests (JSONL, one sample a line).")
store_app = typer.Typer(no_args_is_help=True, help="Inspect latent stores.")
app.add_typer(moe_app, name="moe")
app.add_typer(data_app, name="data")
app.add_typer(store_app, name="store")
mllm_app = typer.Typer(
    no_args_is_help=True, help="Uni-MoE: a sparse-MoE multimodal LLM (stages 1-3, evaluation, chat)."
)
app.add_typer(mllm_app, name="mllm")


@app.callback()
def main(
    threads: Optional[str] = typer.Option(
        None,
        "--threads",
        help="Torch CPU threads of long jobs: auto (small-op jobs 1, large-op jobs the free cores, followed "
        "as the load changes), torch (one per core), or a number. Default: $OMNIMOE_THREADS, else auto.",
    ),
) -> None:
    """omnimoe: multimodal models from frozen unimodal ones with Mixture-of-Experts."""
    import os

    from omnimoe.threads import ENV, check_setting

    if threads is not None:
        try:
            os.environ[ENV] = check_setting(threads.strip())
        except ValueError as exc:
            _fail(str(exc))


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@moe_app.command("example")
def moe_example(
    out: Path = typer.Option(Path("runs/moe-example"), help="Output folder (results.json, plots, saved layer)."),
    config: Optional[Path] = typer.Option(None, help="YAML recipe (see configs/moe_example.yaml)."),
    set_: List[str] = typer.Option([], "--set", help="Dotted override, e.g. --set num_experts=16 (repeatable)."),
    quick: bool = typer.Option(False, help="A few seconds: few steps, small test set (for CI)."),
) -> None:
    """Train a dense MLP and an MoE at equal active FLOPs on a clustered task; upcycle; save and reload."""
    from omnimoe.demos.moe_engine import EngineDemoConfig, format_table, run_engine_demo

    overrides = (["steps=40", "upcycle_steps=20", "test_tokens=512"] if quick else []) + list(set_)
    try:
        cfg = load_config(EngineDemoConfig, config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    result = run_engine_demo(cfg, out)
    typer.echo(format_table(result))
    typer.echo(f"\nresults: {out / 'results.json'}; plots: " + ", ".join(str(out / p) for p in result["plots"]))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder (data, stores, runs, results, plots, connectors)."),
    quick: bool = typer.Option(
        False, help="Smoke-test size: a slice of the data, the smallest towers, short training, 2 methods, 1 seed."
    ),
    cache: Optional[Path] = typer.Option(
        None, help="Download cache for the Tux Paint package (default ~/.cache/omnimoe)."
    ),
) -> None:
    """The main demo: Alt-MoE on Tux Paint (text, image, speech, sound), every method, 3 seeds, held-out recall."""
    from omnimoe.demos.altmoe import report, run_demo

    try:
        result = run_demo(out, quick=quick, cache=cache)
    except (OSError, RuntimeError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(report(result))
    typer.echo(
        f"\nresults: {out / 'results.json'}, {out / 'results.md'}; plots: " + ", ".join(p.name for p in result["plots"])
    )


@data_app.command("tuxpaint")
def data_tuxpaint(
    out: Path = typer.Option(..., help="Folder for manifest.jsonl (media stay in the cache)."),
    cache: Optional[Path] = typer.Option(
        None, help="Where the .deb is downloaded and unpacked (default ~/.cache/omnimoe)."
    ),
    include_symbols: bool = typer.Option(False, help="Keep the 'symbols' category (letters, digits, math signs)."),
    synthesize_speech: bool = typer.Option(
        True, help="Speak captions with espeak-ng where no English recording exists."
    ),
) -> None:
    """Fetch the Tux Paint stamps (Debian package) and write the demo manifest."""
    from omnimoe.data.tuxpaint import build_tuxpaint_manifest

    try:
        path, stats = build_tuxpaint_manifest(
            out, cache, include_symbols=include_symbols, synthesize_speech=synthesize_speech
        )
    except (OSError, RuntimeError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(stats, indent=1))
    typer.echo(f"manifest: {path}")


@data_app.command("art4apps")
def data_art4apps(
    out: Path = typer.Option(..., help="Folder for manifest.jsonl (media stay in the cache)."),
    cache: Optional[Path] = typer.Option(
        None, help="Where the .deb is downloaded and unpacked (default ~/.cache/omnimoe)."
    ),
    test_fraction: float = typer.Option(0.2, min=0.0, max=0.9, help="Share of the words in the test split."),
) -> None:
    """Fetch the Art4Apps word pictures (585 cartoons, one word each; Debian package pysiogame) and write a
    text/image manifest."""
    from omnimoe.data.art4apps import build_art4apps_manifest

    try:
        path, stats = build_art4apps_manifest(out, cache, test_fraction=test_fraction)
    except (OSError, RuntimeError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(stats, indent=1))
    typer.echo(f"manifest: {path}")


@data_app.command("folder")
def data_folder(
    media: Path = typer.Option(..., help="Folder holding the media files."),
    captions: Path = typer.Option(..., help="CSV (header: file, caption[, id, split]) or JSONL with those fields."),
    out: Path = typer.Option(..., help="Manifest file to write."),
    test_fraction: float = typer.Option(0.2, help="Share of caption groups in the test split (when no split column)."),
) -> None:
    """A folder of images/audio plus a caption table -> manifest."""
    from omnimoe.data.adapters import manifest_from_folder
    from omnimoe.data.manifest import ManifestError

    try:
        typer.echo(f"manifest: {manifest_from_folder(media, captions, out, test_fraction)}")
    except ManifestError as exc:
        _fail(str(exc))


@data_app.command("llava")
def data_llava(
    json_file: Path = typer.Argument(..., help="LLaVA-style JSON list."),
    out: Path = typer.Option(..., help="Manifest file to write."),
    media_root: Optional[Path] = typer.Option(
        None, help="Folder the media paths are relative to (default: the JSON's)."
    ),
    split: str = typer.Option("train"),
) -> None:
    """LLaVA-style instruction JSON -> manifest."""
    from omnimoe.data.adapters import manifest_from_llava
    from omnimoe.data.manifest import ManifestError

    try:
        typer.echo(f"manifest: {manifest_from_llava(json_file, out, media_root, split)}")
    except ManifestError as exc:
        _fail(str(exc))


@data_app.command("merge")
def data_merge(
    manifests: list[str] = typer.Argument(
        ..., help="NAME=MANIFEST for each data set (or a bare path: the name is its folder's)."
    ),
    out: Path = typer.Option(..., help="Manifest file to write."),
    test_from: Optional[str] = typer.Option(
        None, help="Comma list of the sets whose test split is kept; the others' test records are set aside."
    ),
    val_fraction: float = typer.Option(
        0.1, min=0.0, max=0.9, help="Share of train captions carved as val in a set that has no val split."
    ),
) -> None:
    """Several manifests -> one, to train on several data sets together (ids prefixed by their set's name)."""
    from omnimoe.data.adapters import merge_manifests
    from omnimoe.data.manifest import ManifestError

    sources: dict[str, str] = {}
    for item in manifests:
        name, sep, path = item.partition("=")
        if not sep or "/" in name or "\\" in name or Path(item).is_file():  # a bare path, '=' in it or not
            name, path = Path(item).resolve().parent.name, item
        if name in sources:
            _fail(f"data set name {name!r} given twice; name them: NAME=MANIFEST")
        sources[name] = path
    try:
        path, stats = merge_manifests(
            sources, out, [t for t in (test_from or "").split(",") if t] or None, val_fraction
        )
    except ManifestError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(stats, indent=1))
    typer.echo(f"manifest: {path}")


@data_app.command("validate")
def data_validate(
    manifest: Path = typer.Argument(...),
    no_files: bool = typer.Option(False, "--no-files", help="Skip checking that media files exist."),
    decode: bool = typer.Option(
        True, "--decode/--no-decode", help="Read every image and audio file (a corrupt one is a problem)."
    ),
) -> None:
    """Check a manifest: ids, splits, captions, media files (present and decodable). Exit 1 when there are problems."""
    from omnimoe.data.manifest import ManifestError, validate_manifest
    from omnimoe.encoders.media import read_audio, read_image

    def read(field: str, path: Path) -> None:
        (read_image if field == "image" else read_audio)(path)  # BadInput (a ValueError) names the file

    try:
        report = validate_manifest(manifest, check_files=not no_files, decode=read if decode else None)
    except ManifestError as exc:
        _fail(str(exc))
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def extract(
    manifest: Path = typer.Option(..., help="Manifest (JSONL)."),
    encoder: str = typer.Option(
        ..., help="Encoder name (minilm, mpnet, efficientnet-lite0, whisper-tiny, gemma3-270m, hf:<id or folder>)."
    ),
    out: Path = typer.Option(..., help="Store folder (created; rerun the same command to resume)."),
    field: Optional[str] = typer.Option(None, help="Manifest field to encode (default: the encoder's modality)."),
    tokens: bool = typer.Option(False, "--tokens", help="Also store per-token states (with lengths)."),
    layers: str = typer.Option("last", help="Hidden layers: last, last2 (mean of the last two), or indices '-1,-2'."),
    pooling: str = typer.Option("mean", help="mean, cls or last."),
    batch_size: int = typer.Option(32),
    dtype: str = typer.Option("auto", help="auto (bf16 where fast), float32 or bfloat16."),
    shard_size: int = typer.Option(1024, help="Rows per shard file (the unit of resumption)."),
    on_error: str = typer.Option("skip", help="Bad items: skip (reported and recorded) or fatal."),
) -> None:
    """Encode a manifest field once into a latent store. Resumable; under torchrun the ranks split the shards."""
    from omnimoe.config import from_dict
    from omnimoe.data.manifest import ManifestError
    from omnimoe.encoders import EncoderOptions
    from omnimoe.latents.extract import ExtractionError, extract as run_extract
    from omnimoe.latents.store import StoreError

    try:
        options = from_dict(
            EncoderOptions, {"layers": layers, "pooling": pooling, "batch_size": batch_size, "dtype": dtype}
        )
        index = run_extract(manifest, encoder, out, field, tokens, shard_size, on_error, options)  # type: ignore[arg-type]
    except (ConfigError, ManifestError, StoreError, ExtractionError, ValueError, ImportError) as exc:
        _fail(str(exc))
    finish_distributed()
    if index is not None:
        rows = sum(s["rows"] for s in index["shards"])
        skipped = sum(len(s["skipped"]) for s in index["shards"])
        typer.echo(f"{out}: {rows} rows in {len(index['shards'])} shards, {skipped} skipped, dim {index['dim']}")


@app.command()
def align(
    manifest: Path = typer.Option(..., help="Manifest (JSONL) with train/test splits."),
    encoders: str = typer.Option(
        "text=mpnet,image=efficientnet-lite2",
        help="modality=encoder[@field],... (at least two; the default pair was chosen by a sweep on dev splits).",
    ),
    out: Path = typer.Option(
        Path("runs/align"), help="Output folder: stores, runs, results.json, results.md, plots, connectors."
    ),
    methods: str = typer.Option(
        "all", help="Comma list of linear, mlp-alternating, moe-joint, moe-alternating, or 'all'."
    ),
    seeds: str = typer.Option("0,1,2", help="Comma list of seeds (every method runs each)."),
    config: Optional[Path] = typer.Option(None, help="YAML with TrainConfig fields (see configs/align.yaml)."),
    set_: List[str] = typer.Option([], "--set", help="TrainConfig override, e.g. --set steps=500 (repeatable)."),
    label_prior: bool = typer.Option(
        True,
        help="Also score the label prior (an encoder's own classifier, e.g. EfficientNet's "
        "ImageNet head, bridged into text space) alone and fused with each connector.",
    ),
    sweep: Optional[Path] = typer.Option(
        None,
        help="YAML of candidate recipes (and data sets) to choose between on a dev split held out from "
        "training and early stopping: runs them all into --out/<dataset>/<candidate> and writes sweep.md, "
        "sweep.json and chosen.json (see configs/sweep.yaml).",
    ),
) -> None:
    """Extract (reusing stores), train every method with every seed, evaluate on the test split, plot. With
    --sweep: run each candidate recipe and choose on a held-out dev split."""
    from omnimoe.align.pipeline import (
        AlignConfig,
        markdown_table,
        parse_encoders,
        parse_seeds,
        run_align,
        zero_shot_table,
    )
    from omnimoe.align.config import METHODS, TrainConfig
    from omnimoe.data.manifest import ManifestError
    from omnimoe.latents.extract import ExtractionError
    from omnimoe.latents.store import StoreError

    try:
        train_cfg = load_config(TrainConfig, config, list(set_))
        cfg = AlignConfig(
            manifest=str(manifest),
            encoders=parse_encoders(encoders),
            out=str(out),
            methods=list(METHODS) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()],
            seeds=parse_seeds(seeds),
            train=train_cfg,
            label_prior=label_prior,
        )
        if sweep is not None:
            from omnimoe.align.sweep import load_sweep, run_sweep

            chosen = run_sweep(load_sweep(sweep), cfg)["chosen"]
        else:
            result = run_align(cfg)
    except (ConfigError, ManifestError, StoreError, ExtractionError, ValueError, ImportError) as exc:
        _fail(str(exc))
    finish_distributed()
    if sweep is not None:
        typer.echo((out / "sweep.md").read_text())
        typer.echo(
            f"chosen on the dev split: {chosen['candidate']} / {chosen['method']} / {chosen['head']} "
            f"(mean R@1 {chosen['dev_mean_r1']:.3f}); {out / 'chosen.json'}"
        )
        return
    if not result["summary"]:
        return  # a non-zero rank under torchrun: rank 0 reports
    typer.echo(markdown_table(result["summary"]) + zero_shot_table(result["zeroshot"]))
    typer.echo(
        f"results: {out / 'results.json'}, {out / 'results.md'}; plots: " + ", ".join(p.name for p in result["plots"])
    )


@store_app.command("info")
def store_info(
    store: Path = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Rows, unique ids, encoder, weights hash, dim and shards of a store, the items it skipped and why, and
    whether every shard still matches its checksum (``damaged``)."""
    from omnimoe.latents.store import LatentStore, StoreError

    try:
        opened = LatentStore.open(store)
        data = {**opened.info(), "damaged": opened.verify()}
    except StoreError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(data))
    else:
        for k, v in data.items():
            typer.echo(f"{k:>13}: {v}")


@store_app.command("verify")
def store_verify(store: Path = typer.Argument(...)) -> None:
    """Read every shard of a store and check it against the checksum written with it; exit 1 naming each
    damaged shard."""
    from omnimoe.latents.store import LatentStore, StoreError

    try:
        opened = LatentStore.open(store)
        damaged = opened.verify()
        if not damaged:
            opened.pooled()  # shapes and finite values too
    except StoreError as exc:
        _fail(str(exc), code=1)
    if damaged:
        _fail("\n".join(damaged), code=1)
    typer.echo(f"{store}: {len(opened.index['shards'])} shard(s), {len(opened)} rows, every checksum matches")


def _retriever(run: Path, method: str, index: str, rebuild: bool = False, label_prior: Optional[bool] = None):
    from omnimoe.retrieval import IndexSpec, Retriever

    try:
        retriever = Retriever(
            run, method=method or None, spec=IndexSpec(kind=index), rebuild=rebuild, label_prior=label_prior
        )  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:  # IndexMismatch is a ValueError
        _fail(str(exc))
    typer.echo(f"serving {retriever.served}", err=True)
    return retriever


_RUN = typer.Option(Path("runs/demo"), help="An alignment run (`omnimoe demo` / `omnimoe align` output).")
_METHOD = typer.Option(
    "",
    help="Which trained connector of the run (linear, mlp-alternating, moe-joint, moe-alternating); "
    "default: the one the run chose on validation.",
)
_PRIOR = typer.Option(
    None,
    "--label-prior/--no-label-prior",
    help="Fuse the connector's score with the label prior; default: where validation chose it.",
)
_INDEX = typer.Option(
    "flat", help="Index kind: flat (exact), ivf, hnsw (approximate, for large stores), torch (exact, no faiss)."
)


@app.command()
def search(
    text: Optional[str] = typer.Argument(None, help="A text query (or give --image / --audio)."),
    target: str = typer.Option("image", help="The modality to search (e.g. image, text, speech, sound)."),
    k: int = typer.Option(5, "-k", min=1, max=1000, help="How many results."),
    image: Optional[Path] = typer.Option(None, help="An image file as the query."),
    audio: Optional[Path] = typer.Option(None, help="An audio file as the query."),
    source: Optional[str] = typer.Option(
        None, help="The query's modality when several read the same input (e.g. speech or sound)."
    ),
    run: Path = _RUN,
    method: str = _METHOD,
    label_prior: Optional[bool] = _PRIOR,
    index: str = _INDEX,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Search the stored items of one modality with a text, an image or an audio query."""
    from omnimoe.retrieval import IndexMismatch, QueryError

    given = [(kind, q) for kind, q in (("text", text), ("image", image), ("audio", audio)) if q is not None]
    if len(given) != 1:
        _fail("give exactly one query: a text argument, --image PATH or --audio PATH")
    kind, query = given[0]
    retriever = _retriever(run, method, index, label_prior=label_prior)
    try:
        src = retriever.source_for(kind, target, source)
        hits, ms = retriever.timed_search(src, target, [str(query)], k)
    except (QueryError, IndexMismatch, OSError) as exc:
        _fail(str(exc))
    rows = [{**h.__dict__, **(retriever.item(h.id) or {})} for h in hits[0]]
    if as_json:
        served = {"method": retriever.method, "head": retriever.head, "chosen_on_validation": retriever.chosen}
        typer.echo(json.dumps({"direction": f"{src}->{target}", "took_ms": round(ms, 2), "results": rows, **served}))
        return
    typer.echo(f"{src} -> {target}: top {len(rows)} of {len(retriever.index(f'{src}->{target}'))} ({ms:.1f} ms)")
    for r in rows:
        typer.echo(f"{r['rank']:>3}. {r['score']:.3f}  {r['id']}  {r.get('text') or ''}")


@app.command("index")
def build_index(
    run: Path = _RUN,
    method: str = _METHOD,
    label_prior: Optional[bool] = _PRIOR,
    index: str = _INDEX,
    rebuild: bool = typer.Option(False, help="Replace existing indexes (e.g. after retraining the connector)."),
) -> None:
    """Build (or update with new store items) the index of every direction of a run."""
    retriever = _retriever(run, method, index, rebuild, label_prior=label_prior)
    try:
        sizes = retriever.build_all()
    except (OSError, ValueError) as exc:  # IndexMismatch is a ValueError
        _fail(str(exc))
    for d, n in sizes.items():
        typer.echo(f"{d:<20} {n} items")
    typer.echo(f"indexes: {retriever.index_root}")


@app.command()
def serve(
    run: Path = _RUN,
    method: str = _METHOD,
    label_prior: Optional[bool] = _PRIOR,
    index: str = _INDEX,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port (0: any free port; the chosen one is printed)."),
    max_upload_mb: float = typer.Option(10.0, help="Largest accepted upload."),
    coalesce: bool = typer.Option(True, help="Run concurrent queries of one direction as one encoder batch."),
) -> None:
    """The retrieval service: POST /search, GET /items/{id}, GET /media/{field}/{id}, GET /health, a web page at /."""
    from omnimoe.retrieval.service import ServiceConfig, serve as run_service

    retriever = _retriever(run, method, index, label_prior=label_prior)
    for problem in retriever.problems():
        typer.secho(f"warning: {problem}", err=True, fg=typer.colors.YELLOW)
    run_service(
        retriever, ServiceConfig(host=host, port=port, max_upload_bytes=int(max_upload_mb * 2**20), coalesce=coalesce)
    )


@mllm_app.command("train")
def mllm_train(
    stage: int = typer.Option(..., help="1: connectors; 2: one dense FFN per modality group; 3: MoE from them + LoRA."),
    config: Optional[Path] = typer.Option(None, help="YAML recipe (see configs/unimoe/)."),
    out: Path = typer.Option(..., help="Output folder of this stage (resumes when it holds a state.pt)."),
    set_: List[str] = typer.Option(
        [], "--set", help="Dotted override, e.g. --set steps=100 --set moe.num_experts_per_tok=1."
    ),
    eval_: bool = typer.Option(
        True, "--eval/--no-eval", help="Score the recipe's eval_data with the trained model at the end."
    ),
) -> None:
    """Train one Uni-MoE stage from a recipe (under torchrun: DDP, and expert parallelism with expert_parallel=true)."""
    from omnimoe.mllm.data import DataError
    from omnimoe.mllm.train import MLLMTrainConfig, run_stage

    try:
        cfg = load_config(MLLMTrainConfig, config, [f"stage={stage}", *set_])
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    try:
        result = run_stage(cfg, out)
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if eval_ and cfg.eval_data and "model" in result:
        from omnimoe.mllm.evaluate import evaluate_folder

        summary = evaluate_folder(result["model"], result["tokenizer"], cfg, out)
        typer.echo(json.dumps(summary.get("tasks", {}), indent=1))
    finish_distributed()
    typer.echo(f"stage {stage} done: {out}")


@mllm_app.command("eval")
def mllm_eval(
    model: Path = typer.Option(
        ..., help="A stage folder (stage 1, one stage-2 group, or stage 3) or a saved model folder."
    ),
    data: Path = typer.Option(..., help="Held-out task file (LLaVA-style JSON with task/answer fields)."),
    out: Optional[Path] = typer.Option(None, help="Write eval.json here (default: beside the model)."),
    limit: int = typer.Option(0, help="Score only the first N records (0: all)."),
    control: bool = typer.Option(
        True,
        "--control/--no-control",
        help="Also score every record with another record's media "
        "(the media-swap control: swapped score and seeing gain per task).",
    ),
) -> None:
    """Score a trained model on a task file: accuracy (closed questions), token F1 (open), spread across tasks,
    and the media-swap control."""
    from omnimoe.mllm.evaluate import evaluate_folder
    from omnimoe.mllm.train import load_stage

    try:
        m, tok, cfg = load_stage(model)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    cfg.eval_data, cfg.eval_limit = str(data), limit
    summary = evaluate_folder(m, tok, cfg, out or (model if model.is_dir() else model.parent), control=control)
    typer.echo(json.dumps(summary, indent=1))


@mllm_app.command("chat")
def mllm_chat(
    prompt: str = typer.Argument(..., help="The question; media placeholders are added in front when missing."),
    model: Path = typer.Option(Path("runs/unimoe/stage3"), help="A stage folder or saved model folder."),
    image: List[Path] = typer.Option([], help="Image file (repeatable)."),
    audio: List[Path] = typer.Option([], help="Audio file (speech or sound; repeatable)."),
    video: List[Path] = typer.Option(
        [], help="A video file (8 frames evenly spaced) or a folder of frames (repeatable)."
    ),
    max_new_tokens: int = typer.Option(64),
) -> None:
    """Ask the trained model: omnimoe mllm chat --image x.png --audio y.wav "What is this?"."""
    from omnimoe.encoders.base import BadInput
    from omnimoe.mllm.chat import ChatSession

    try:
        session = ChatSession(model)
        typer.echo(
            session.ask(
                prompt, [str(p) for p in image], [str(p) for p in audio], [str(p) for p in video], max_new_tokens
            )
        )
    except (BadInput, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@mllm_app.command("tasks")
def mllm_tasks(
    out: Path = typer.Option(Path("runs/unimoe/tasks"), help="Folder for stage1/stage2-*/stage3/test JSON files."),
    manifest: Optional[Path] = typer.Option(
        None, help="A Tux Paint manifest (default: fetch Tux Paint and write one beside OUT)."
    ),
    max_per_task: int = typer.Option(0, help="Cap each task per split (0: no cap)."),
    eval_per_task: int = typer.Option(
        24, help="Records per task in test-eval.json (generation is the slow part on a CPU)."
    ),
    val_fraction: float = typer.Option(
        0.0, help="Share of train captions moved to val.json (choose recipes there, not on test)."
    ),
    seed: int = typer.Option(0),
    cache: Optional[Path] = typer.Option(
        None, help="Download cache for the Tux Paint package (default ~/.cache/omnimoe)."
    ),
) -> None:
    """Build the Tux Paint instruction tasks (image, speech and sound questions) as LLaVA-style JSON."""
    from omnimoe.data.manifest import ManifestError
    from omnimoe.data.tuxpaint import build_tuxpaint_manifest
    from omnimoe.mllm.tasks import build_tuxpaint_tasks

    from omnimoe.demos.unimoe import eval_subset

    try:
        if manifest is None:
            manifest, _ = build_tuxpaint_manifest(out.parent / "data", cache)
        files = build_tuxpaint_tasks(
            manifest, out, seed=seed, max_per_task=max_per_task or None, val_fraction=val_fraction
        )["files"]
    except (ManifestError, ValueError, RuntimeError, OSError) as exc:  # a fetch, a manifest or a setting
        _fail(str(exc))
    eval_subset(out, eval_per_task, seed)
    typer.echo(json.dumps(files, indent=1))


@mllm_app.command("demo")
def mllm_demo(
    out: Path = typer.Option(Path("runs/unimoe"), help="Output folder (tasks, stages, results, plots)."),
    quick: bool = typer.Option(False, help="Smoke-test size: a few records per task and a few steps per stage."),
    set_: List[str] = typer.Option([], "--set", help="Dotted override for every stage's recipe (e.g. --set steps=50)."),
    seed: int = typer.Option(0, help="Seed of every stage (the tasks and the held-out split stay the same)."),
    held_out: str = typer.Option(
        "test", help="Split scored: test (report) or val (choose a recipe: a fifth of train held out)."
    ),
) -> None:
    """Uni-MoE on the embedded defaults: Gemma-3-270M + EfficientNet-Lite0 + Whisper-tiny on Tux Paint tasks;
    stages 1-3, a dense equal-active comparison, per-task scores after every stage with the media-swap
    control, blind and probe-ceiling rows, chat answers on held-out stamps, expert-load plots."""
    from omnimoe.demos.unimoe import format_table, run_unimoe_demo

    try:
        result = run_unimoe_demo(out, quick=quick, overrides=list(set_), seed=seed, held_out=held_out)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(format_table(result))
    typer.echo(f"\nresults: {out / 'results.json'}; plots: " + ", ".join(result["plots"]))


@mllm_app.command("seeds")
def mllm_seeds(
    runs: List[Path] = typer.Argument(..., help="Demo output folders (one per seed), each with results.json."),
    out: Optional[Path] = typer.Option(None, help="Also write the aggregate as JSON here."),
) -> None:
    """Mean ± std over seeds of every model and task of several `omnimoe mllm demo` runs, with the swapped-media
    score, the share of "yes" replies and each model's spread across tasks (raw and relative to the probe ceiling)."""
    from omnimoe.demos.unimoe import aggregate_seeds, format_seeds
    from omnimoe.io import write_json

    missing = [str(r) for r in runs if not (r / "results.json").is_file()]
    if missing:
        _fail(f"no results.json in {', '.join(missing)} (run `omnimoe mllm demo --out <folder>` first)")
    agg = aggregate_seeds(runs)
    typer.echo(format_seeds(agg))
    for model, sp in agg["spread"].items():
        rel = sp["relative_to_ceiling"]
        typer.echo(
            f"spread across tasks, {model}: max-min {sp['max_min']:.3f}, std {sp['std']:.3f}"
            + (f"; score/ceiling max-min {rel['max_min']:.3f}, std {rel['std']:.3f}" if rel else "")
        )
    for c in agg["chat"]:
        typer.echo(
            f"chat, seed {c['seed']}: {c['right_object']}/{c['n']} held-out stamps named right, "
            f"{c['right_category']}/{c['n']} named as an object of their category"
        )
    if out is not None:
        write_json(out, agg)


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Versions and what this machine can run (bf16 speed-up, grouped_mm, threads and their policy)."""
    import torch

    from omnimoe import __version__, threads
    from omnimoe.moe.experts import grouped_mm_supported

    data = {
        "omnimoe": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "thread_policy": threads.setting(),
        "usable_cores": threads.usable_cores(),
        "cuda": torch.cuda.is_available(),
        "grouped_mm_cpu_bf16": grouped_mm_supported(torch.bfloat16, torch.device("cpu"), 64),
    }
    if as_json:
        typer.echo(json.dumps(data))
    else:
        for k, v in data.items():
            typer.echo(f"{k:>20}: {v}")


if __name__ == "__main__":
    app()
