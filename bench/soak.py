"""Soak: kill -9 one rank of a 2-stage run at a random moment, rerun it to the end, and require the
final adapter to equal an uninterrupted run's byte for byte. Repeated for N trials.

Everything is real: a moto S3 server over HTTP holds the tiny random Mistral, the prepared shards,
checkpoints and adapters; `pipelora-k8s train` runs under mpirun with 2 ranks on the CPU. Each
trial draws (from --seed) which rank dies and when. The moment is drawn against the trial's own
progress, since a loaded machine stretches runs unevenly: a random optimizer step k, then a random
delay of up to two step times after the first rank logs it (so the kill lands in a step, a
checkpoint upload or commit, a pruning or the adapter export), or, for a tenth of the trials, a
random moment of the start-up (imports, weight loading, the lease). The rerun is the same command
line, as a launcher's next attempt would run it. After the rerun every commit marker left in the
run folder is verified object by object.

Prints one JSON line per trial and a summary line; exits non-zero unless every trial ended with
the reference adapter. Not part of `make test`.

    python bench/soak.py --trials 20 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from common import CLI, free_port, mpirun

BUCKET = "soak"
RUN_TIMEOUT_S = 900  # a hung run is a failed trial, not a stuck soak
STEP = re.compile(r"^\[stage \d+/2 dp 0/1\] step (\d+)/\d+ ", re.M)
RESUMED = re.compile(r"resumed from \S+ \(step (\d+)\)")
_LAUNCHED: list[subprocess.Popen[str]] = []  # ended on the way out, should the soak be interrupted


def run(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if done.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout


class World:
    """The moto server, the bucket and what every run shares."""

    def __init__(self, workdir: Path, *, steps: int) -> None:
        self.workdir = workdir
        self.steps = steps
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **self.credentials()})
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if self.moto.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the moto server did not start")
                time.sleep(0.1)
        os.environ.update(self.credentials())
        import boto3

        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        self.s3.create_bucket(Bucket=BUCKET)

    @staticmethod
    def credentials() -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def close(self) -> None:
        self.moto.terminate()
        self.moto.wait(timeout=30)

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.credentials(), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
                "PYTHONUNBUFFERED": "1", "PIPELORA_CACHE": str(self.workdir / "cache")}

    def spec(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "storage": {"uri": f"s3://{BUCKET}/runs", "endpoint_url": self.endpoint},
            "model": {"uri": f"s3://{BUCKET}/models/tiny-mistral"},
            "dataset": {"uri": str(self.workdir / "learnable.jsonl"), "seq_len": 64, "eval_fraction": 0.05},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"},  # dropout: RNG restored
            "parallel": {"stages": 2, "nodes": 1, "gpus_per_node": 2, "micro_batch_size": 2, "micro_batches": 4},
            "training": {"max_steps": self.steps, "lr": 2.0e-3, "warmup_steps": 2, "schedule": "cosine", "seed": 7,
                         "checkpoint_every_steps": 2, "keep_checkpoints": 2, "eval_every_steps": 5,
                         "eval_batches": 2, "activation_checkpointing": False, "dtype": "fp32"},
        }

    def config(self, name: str) -> Path:
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(self.spec(name)), encoding="utf-8")
        return path

    def prepare(self) -> None:
        from pipelora.trainer.init_model import write_random_model

        model = write_random_model(self.workdir / "tiny-mistral", family="mistral", preset="tiny", seed=3,
                                   max_shard_bytes=3 * 1024 * 1024)
        for path in sorted(model.iterdir()):
            if path.is_file():
                self.s3.upload_file(str(path), BUCKET, f"models/tiny-mistral/{path.name}")
        run([CLI, "make-dataset", "--out", str(self.workdir / "learnable.jsonl"), "--examples", "300", "--seed", "1"],
            self.env())
        run([CLI, "dataprep", "--config", str(self.config("prepared"))], self.env())

    def copy_data(self, name: str) -> None:
        prefix = "runs/prepared/data/"
        for item in self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
            key = item["Key"]
            self.s3.copy_object(Bucket=BUCKET, Key=f"runs/{name}/data/{key[len(prefix):]}",
                                CopySource={"Bucket": BUCKET, "Key": key})

    def layout(self, name: str) -> Any:
        from pipelora.layout import RunLayout

        return RunLayout.of(f"s3://{BUCKET}/runs", name)

    def read(self, uri: str) -> bytes:
        key = uri.removeprefix(f"s3://{BUCKET}/")
        return bytes(self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def outcome(self, name: str) -> tuple[bytes, list[Any]]:
        layout = self.layout(name)
        return self.read(layout.adapter_weights), json.loads(self.read(layout.progress))["losses"]

    def verify_markers(self, name: str) -> int:
        """Every commit marker in the run folder, checked object by object; how many there were."""
        from pipelora.layout import parse_step_dir
        from pipelora.storage import S3Storage

        store = S3Storage(endpoint_url=self.endpoint)
        layout = self.layout(name)
        count = 0
        for folder in store.list_dirs(layout.checkpoints):
            step = parse_step_dir(folder)
            if step is not None and store.exists(layout.checkpoint_marker(step)):
                store.verify_committed(layout.checkpoint_marker(step))
                count += 1
        return count


def leftover_ranks(config: Path) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if str(config) in (p.info["cmdline"] or [])]


def launch(world: World, config: Path) -> tuple[subprocess.Popen[str], list[tuple[float, str]], threading.Thread]:
    """mpirun in the background; its stdout lines are collected with their arrival times."""
    proc = subprocess.Popen([*mpirun(2), CLI, "train", "--config", str(config)], env=world.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _LAUNCHED.append(proc)
    lines: list[tuple[float, str]] = []

    def _read() -> None:
        for line in proc.stdout or []:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=_read, daemon=True)
    reader.start()
    return proc, lines, reader


def ranks_of(proc: subprocess.Popen[str]) -> dict[int, Any]:
    """The rank processes mpirun started, by their MPI rank."""
    import psutil

    out = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            rank = child.environ().get("OMPI_COMM_WORLD_RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "train" in child.cmdline():
            out[int(rank)] = child
    return out


def reference(world: World) -> dict[str, Any]:
    world.copy_data("soak-reference")
    config = world.config("soak-reference")
    began = time.monotonic()
    proc, lines, reader = launch(world, config)
    code = proc.wait(timeout=RUN_TIMEOUT_S)
    reader.join(timeout=60)
    if code != 0:
        sys.exit("the uninterrupted run failed:\n" + "".join(line for _, line in lines)[-4000:])
    steps = [(t, int(m.group(1))) for t, line in lines if (m := STEP.match(line))]
    first, last = min(t for t, k in steps if k == 1), max(t for t, k in steps if k == world.steps)
    adapter, losses = world.outcome("soak-reference")
    return {"adapter": adapter, "losses": losses, "startup_s": first - began,
            "step_s": (last - first) / max(world.steps - 1, 1)}


def logged_step(lines: list[tuple[float, str]], step: int) -> bool:
    return any((m := STEP.match(line)) and int(m.group(1)) >= step for _, line in list(lines))


def error_lines(text: str) -> list[str]:
    """What a failed run said about why: its `error:` lines, or the end of a traceback."""
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    if errors:
        return errors[:4]
    tail = [line for line in text.splitlines() if line.strip() and not line.startswith(("-", " "))]
    return tail[-4:]


def trial(world: World, ref: dict[str, Any], index: int, rng: random.Random) -> dict[str, Any]:
    name = f"soak-{index:02d}"
    world.copy_data(name)
    config = world.config(name)
    rank = rng.randrange(2)
    from_launch = rng.random() < 0.1
    after_step = 0 if from_launch else rng.randint(1, world.steps)
    delay = rng.uniform(0.0, ref["startup_s"] if from_launch else 2 * ref["step_s"])
    began = time.monotonic()
    proc, lines, reader = launch(world, config)
    while after_step and proc.poll() is None and not logged_step(lines, after_step):
        time.sleep(0.01)
    target = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < target:
        time.sleep(0.01)
    killed = False
    if proc.poll() is None:
        victim = ranks_of(proc).get(rank)
        if victim is not None:
            try:
                victim.send_signal(signal.SIGKILL)
                killed = True
            except Exception:  # noqa: BLE001 - it exited on its own in between
                killed = False
    killed_at = time.monotonic() - began
    try:
        first_exit: int | str = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        first_exit = "hung"
    reader.join(timeout=60)
    text = "".join(line for _, line in lines)
    steps_before = [int(s) for s in STEP.findall(text)]
    stray = leftover_ranks(config)
    for pid in stray:  # never into the rerun: a rank that outlived its launcher is a finding
        os.kill(pid, signal.SIGKILL)
    rerun = subprocess.run([*mpirun(2), CLI, "train", "--config", str(config)], env=world.env(),
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    resumed = RESUMED.search(rerun.stdout)
    result: dict[str, Any] = {
        "trial": index, "rank_killed": rank, "moment": "start-up" if from_launch else f"step {after_step}",
        "delay_s": round(delay, 3), "kill_after_s": round(killed_at, 2), "killed": killed,
        "last_step_before_kill": max(steps_before, default=0), "first_exit": first_exit,
        "ranks_left_running": len(stray), "rerun_exit": rerun.returncode,
        "resumed_from_step": int(resumed.group(1)) if resumed else None,
    }
    if first_exit not in (0, "hung") and not killed:
        result["first_errors"] = error_lines(text)
    if rerun.returncode != 0:
        result.update(equal=False, errors=error_lines(rerun.stderr + rerun.stdout))
        return result
    adapter, losses = world.outcome(name)
    try:
        markers: int | str = world.verify_markers(name)
    except Exception as exc:  # noqa: BLE001 - reported as the trial's failure
        markers = f"{type(exc).__name__}: {exc}"
    result.update(adapter_equal=adapter == ref["adapter"], losses_equal=losses == ref["losses"],
                  markers_verified=markers)
    result["equal"] = (result["adapter_equal"] and result["losses_equal"] and isinstance(markers, int)
                       and first_exit != "hung" and not stray)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1, help="draws each trial's rank and moment")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (a checkpoint every 2)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args()
    if shutil.which("mpirun") is None:
        sys.exit("mpirun (Open MPI) is not installed; `make setup` installs openmpi-bin")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pipelora-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("soak: terminated"))  # so that `finally` cleans up
    world = World(workdir, steps=args.steps)
    began = time.monotonic()
    try:
        world.prepare()
        ref = reference(world)
        print(json.dumps({"figure": "soak_reference", "startup_s": round(ref["startup_s"], 2),
                          "step_s": round(ref["step_s"], 3), "adapter_bytes": len(ref["adapter"])}), flush=True)
        rng = random.Random(args.seed)
        results = []
        for index in range(1, args.trials + 1):
            result = trial(world, ref, index, rng)
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        for proc in _LAUNCHED:
            if proc.poll() is None:
                proc.terminate()  # mpirun passes it on to its ranks
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        world.close()
    equal = sum(bool(r["equal"]) for r in results)
    print(json.dumps({
        "figure": "soak", "result": f"{equal}/{len(results)}", "trials": len(results), "equal": equal,
        "killed": sum(r["killed"] for r in results),
        "resumed_from_a_checkpoint": sum(r["resumed_from_step"] is not None for r in results),
        "restarted_from_scratch": sum(r["resumed_from_step"] is None and r["rerun_exit"] == 0 for r in results),
        "seed": args.seed, "steps": args.steps, "minutes": round((time.monotonic() - began) / 60, 1),
    }), flush=True)
    sys.exit(0 if equal == len(results) else 1)


if __name__ == "__main__":
    main()
