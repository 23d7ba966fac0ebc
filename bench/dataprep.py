"""Dataprep throughput against the raw tokenizer, packing efficiency, and a per-example `datasets.map`.

Prints one JSON line per figure. The dataset is Alpaca-format JSON (default: the shared sample
data beside the checkout, repeated to Alpaca's 52k records); the tokenizer is the real Mistral
one. The raw baseline encodes the same template texts with the same encoder call on the same
number of worker processes (a warm pool: its start-up is not counted), and only returns the ids;
`--workers 0` figures compare both in one process.

    .venv/bin/python bench/dataprep.py --repeat 52 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from itertools import chain
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_zh_demo.json"
_backend = {}


def emit(figure: str, value: float, unit: str, **extra: object) -> None:
    print(json.dumps({"bench": "dataprep", "figure": figure, "value": round(value, 4), "unit": unit, **extra}), flush=True)


def _init(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    _backend["tokenizer"] = Tokenizer.from_str(tokenizer_json)


def _encode(texts: list[str]) -> np.ndarray:
    pieces = [e.ids for e in _backend["tokenizer"].encode_batch_fast(texts, add_special_tokens=False)]
    return np.fromiter(chain.from_iterable(pieces), dtype=np.int32)


def template_texts(records: list[dict]) -> list[str]:
    from pipelora.dataprep.records import AlpacaExample
    from pipelora.dataprep.templates import alpaca_prompt

    texts = []
    for r in records:
        texts.append(alpaca_prompt(AlpacaExample(r["instruction"], r.get("input") or "", r["output"])))
        texts.append(r["output"])
    return texts


def raw_encode(pool: ProcessPoolExecutor | None, texts: list[str], *, window: int, workers: int) -> int:
    """The tokenizer alone: each window's texts split over the workers; only ids come back."""
    if pool is None:
        return sum(len(_encode(texts[i : i + 2 * window])) for i in range(0, len(texts), 2 * window))
    futures = []
    for start in range(0, len(texts), 2 * window):
        chunk = texts[start : start + 2 * window]
        step = -(-len(chunk) // workers)
        futures += [pool.submit(_encode, chunk[i : i + step]) for i in range(0, len(chunk), step)]
    return sum(len(f.result()) for f in futures)


def datasets_map(tokenizer, records: list[dict], *, seq_len: int) -> int:
    """What a peer's preprocessing looks like: one example at a time through `Dataset.map`."""
    import datasets

    from pipelora.dataprep.records import AlpacaExample
    from pipelora.dataprep.templates import alpaca_prompt

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list([{k: r.get(k) or "" for k in ("instruction", "input", "output")} for r in records])

    def tokenize(example: dict) -> dict:
        prompt = alpaca_prompt(AlpacaExample(example["instruction"], example["input"], example["output"]))
        full = tokenizer(prompt + example["output"] + tokenizer.eos_token, truncation=True, max_length=seq_len)
        n_prompt = len(tokenizer(prompt)["input_ids"])
        labels = [-100] * n_prompt + full["input_ids"][n_prompt:]
        return {"input_ids": full["input_ids"], "labels": labels}

    with tempfile.TemporaryDirectory() as cache:
        out = ds.map(tokenize, remove_columns=ds.column_names, cache_file_name=os.path.join(cache, "map.arrow"))
        return sum(len(ids) for ids in out["input_ids"])


def profile_parent(run: Callable[[], object]) -> None:
    """Where the parent spends a run: time blocked on the workers' results shows as lock `acquire`."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(run)
    emit("profiled_run_seconds", time.perf_counter() - started, "s")
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Alpaca-format JSON array")
    parser.add_argument("--repeat", type=int, default=52, help="concatenate the records this many times")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is kept")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--profile", action="store_true",
                        help="also profile one dataprep run's parent process (cProfile) and print its top entries")
    args = parser.parse_args()

    from pipelora.config import spec_from_dict
    from pipelora.dataprep.pipeline import READ_WINDOW, run_dataprep
    from pipelora.dataprep.tokenizer import load_tokenizer, write_mistral_tokenizer

    records = json.loads(args.data.read_text(encoding="utf-8")) * args.repeat
    texts = template_texts(records)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        model = write_mistral_tokenizer(root / "model")
        tokenizer = load_tokenizer(model)
        _init(tokenizer.backend_tokenizer.to_str())
        spec = spec_from_dict({
            "name": "bench", "storage": {"uri": str(root / "runs")}, "model": {"uri": str(model)},
            "dataset": {"uri": str(data), "seq_len": args.seq_len, "eval_fraction": 0.01},
            "parallel": {"stages": 1, "micro_batches": 2},
        })
        pool = ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init, initargs=(tokenizer.backend_tokenizer.to_str(),))
        list(pool.map(_encode, [["warm up"]] * args.workers))

        # Interleaved rounds, best of each: other work on the machine slows any one round.
        best: dict[str, float] = {}
        tokens: dict[str, int] = {}
        manifest: dict = {}

        def timed(key: str, fn) -> object:
            started = time.perf_counter()
            result = fn()
            best[key] = min(time.perf_counter() - started, best.get(key, float("inf")))
            return result

        for _ in range(args.rounds):
            tokens["raw"] = timed("raw", lambda: raw_encode(pool, texts, window=READ_WINDOW, workers=args.workers))
            tokens["raw1"] = timed("raw1", lambda: raw_encode(None, texts, window=READ_WINDOW, workers=1))
            manifest = timed("dataprep", lambda: run_dataprep(spec, overwrite=True, workers=args.workers).manifest)
            tokens["dataprep"] = manifest["stats"]["tokens"]
            tokens["dataprep0"] = timed("dataprep0", lambda: run_dataprep(spec, overwrite=True, workers=0)
                                        .manifest["stats"]["tokens"])
            tokens["map"] = timed("map", lambda: datasets_map(tokenizer, records, seq_len=args.seq_len))
        pool.shutdown()
        if args.profile:
            profile_parent(lambda: run_dataprep(spec, overwrite=True, workers=args.workers))
        rate = {k: tokens[k] / best[k] for k in best}
        common = {"records": len(records), "rounds": args.rounds}
        emit("raw_encode_tokens_per_s", rate["raw"], "tokens/s", workers=args.workers, **common)
        emit("raw_encode_one_process_tokens_per_s", rate["raw1"], "tokens/s", workers=1, **common)
        emit("dataprep_tokens_per_s", rate["dataprep"], "tokens/s", workers=args.workers,
             seconds=round(best["dataprep"], 2), **common)
        emit("dataprep_vs_raw_encode", rate["dataprep"] / rate["raw"], "ratio", target=0.8, workers=args.workers)
        emit("dataprep_in_process_tokens_per_s", rate["dataprep0"], "tokens/s", workers=0, **common)
        emit("dataprep_in_process_vs_raw_in_process", rate["dataprep0"] / rate["raw1"], "ratio", workers=0)
        emit("packing_efficiency", manifest["stats"]["packing_efficiency"], "fraction", seq_len=args.seq_len,
             target=0.98, rows=manifest["stats"]["rows"])
        emit("datasets_map_tokens_per_s", rate["map"], "tokens/s", **common)
        emit("dataprep_vs_datasets_map", rate["dataprep"] / rate["map"], "ratio")


if __name__ == "__main__":
    main()
