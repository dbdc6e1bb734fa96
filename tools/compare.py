#!/usr/bin/env python
"""The honest comparison: rtsort against SpikeInterface's sorters on simulated ground truth.

On three simulated recordings (32 ch / 12 units; 32 ch / 24 crowded units with
more noise; 128 ch with drift) run rtsort (Transformer features), rtsort with
PCA features (same pipeline otherwise), tridesclous2 and spykingcircus2 (both
in-process, no containers), and score each with SpikeInterface's ground-truth
comparison (0.4 ms): well-detected units (accuracy >= 0.8), mean accuracy,
wall time (rtsort: train + sort).

    python tools/compare.py [--out compare_out] [--duration 60] [--sorters ...] [--recordings A B C]
                            [--seeds 0 1 2] [--json FILE] [--reuse]

--reuse keeps results already in OUT/results.json (the peers take minutes).
--seeds trains rtsort's rows with each training seed (default 0) and prints
each seed's row and, with more than one, the spread: the Transformer's
features depend on its random start, PCA's hardly.

The development corpus (tools/corpus.py): tune on one half, publish the other.

    python tools/compare.py --corpus tune|report [--ids ID ...] [--sorters ...] [--seeds 0 1 2]
                            [--config FILE.toml] [--reuse | --rtsort-only] [--retry-failed]
                            [--timeout 1800] [--jobs 2] [--corpus-root DIR] [--out compare_out] [--md FILE]

generates whatever corpus recordings are missing, then runs rtsort (train with
the default config, or --config, then sort through the runtime pipeline) with
each training seed, and SpikeInterface's spykingcircus2, tridesclous2, lupin
and mountainsort5 with their default parameters, each in its own process with a
time limit (--timeout s): a run that crashes or times out is recorded as failed
with its one-line error and the rest go on. Scores: SpikeInterface's
ground-truth comparison (0.4 ms): well-detected units (accuracy >= 0.8), mean
accuracy, false-positive units (sorted units matched to no true unit), wall time.
Results are cached per (recording, sorter, seed) in OUT/corpus_results.json:
--reuse reruns only what is missing (failed runs stay failed unless
--retry-failed), --rtsort-only reuses every peer result and reruns rtsort's rows.
The table is generated: the report half goes to docs/accuracy.md (only when
the run covers the whole half; a partial one goes to OUT/accuracy_report.md),
with the results behind it in docs/accuracy_results.json, which --reuse reads
for what OUT lacks (a new checkout reruns rtsort's rows, not the peers'),
the tune half to OUT/accuracy_tune.md, never to docs.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtsort.config import Config
from rtsort.evaluate import sorting_accuracy
from rtsort.io import open_recording
from rtsort.pipeline import sort_recording
from rtsort.sim import simulate
from rtsort.train import train_bundle

RECORDINGS = {
    "A": dict(label="32 ch / 12 units", n_channels=32, n_units=12, noise_uV=10.0, drift=False, seed=1),
    "B": dict(label="32 ch / 24 crowded units, noise 15 uV", n_channels=32, n_units=24, noise_uV=15.0, drift=False,
              seed=2),
    "C": dict(label="128 ch / 40 units, drift", n_channels=128, n_units=40, noise_uV=10.0, drift=True, seed=3),
}
SORTERS = ("rtsort", "rtsort-pca", "tridesclous2", "spykingcircus2")
PEERS = ("spykingcircus2", "tridesclous2", "lupin", "mountainsort5")
# run_sorter arguments by peer (else SpikeInterface's job_kwargs): every other parameter stays the sorter's default
PEER_PARAMS = {
    "mountainsort5": lambda n: dict(n_jobs=n, progress_bar=False),
}
KILOSORT4_NOTE = "Kilosort4: not run (needs a GPU to finish in reasonable time on this machine)"


def run_rtsort(folder: Path, features: str, seed: int = 0):
    rec = open_recording(folder / "recording.bin")
    cfg = Config.from_dict({"train": {"features": features}})
    bundle = folder / (f"bundle_{features}" if seed == 0 else f"bundle_{features}_seed{seed}")
    t0 = time.perf_counter()
    train_bundle(rec, bundle, cfg, seed=seed, progress=False)
    spikes, _ = sort_recording(rec, bundle, progress=False)
    return spikes["sample_index"], spikes["unit"], time.perf_counter() - t0


def run_peer(folder: Path, sorter: str, out: Path | None = None, n_jobs: int = 2):
    import spikeinterface.core as si
    import spikeinterface.sorters as ss
    from probeinterface import Probe

    meta = json.loads((folder / "recording.json").read_text())
    rec = si.read_binary(folder / "recording.bin", sampling_frequency=meta["sampling_rate"], dtype=meta["dtype"],
                         num_channels=meta["n_channels"], gain_to_uV=meta["gain_to_uV"],
                         offset_to_uV=meta["offset_to_uV"])
    probe = Probe(ndim=2)
    probe.set_contacts(np.asarray(meta["channel_positions_um"]), shapes="circle", shape_params={"radius": 6})
    probe.set_device_channel_indices(np.arange(meta["n_channels"]))
    rec = rec.set_probe(probe) or rec
    t0 = time.perf_counter()
    params = PEER_PARAMS.get(sorter, lambda n: dict(job_kwargs=dict(n_jobs=n, progress_bar=False)))(n_jobs)
    so = ss.run_sorter(sorter, rec, folder=out or folder / f"out_{sorter}", remove_existing_folder=True,
                       verbose=False, **params)
    dt = time.perf_counter() - t0
    idx, lab = [], []
    for u in so.unit_ids:
        st = so.get_unit_spike_train(u)
        idx.append(st)
        lab.append(np.full(st.size, int(np.flatnonzero(so.unit_ids == u)[0])))
    return np.concatenate(idx), np.concatenate(lab), dt


def rows(sorter: str, seeds: list) -> list:
    """(result name, training seed) of a sorter's rows: one per seed for rtsort's (seed 0 keeps the plain name)."""
    if not sorter.startswith("rtsort"):
        return [(sorter, 0)]
    return [(sorter if seed == 0 else f"{sorter}@seed{seed}", seed) for seed in seeds]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("compare_out"))
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--recordings", nargs="+", default=list(RECORDINGS), choices=list(RECORDINGS))
    ap.add_argument("--sorters", nargs="+", choices=list(dict.fromkeys(SORTERS + PEERS)),
                    help=f"default: {' '.join(SORTERS)}; with --corpus: rtsort {' '.join(PEERS)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="rtsort's training seeds (default: 0)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--reuse", action="store_true", help="keep results already in OUT/results.json")
    ap.add_argument("--corpus", choices=("tune", "report"), help="run on a half of the development corpus "
                                                                "(tools/corpus.py) instead of A / B / C")
    ap.add_argument("--ids", nargs="+", metavar="ID", help="--corpus: only these recordings of the half")
    ap.add_argument("--corpus-root", type=Path, help="--corpus: the corpus folder (default: tools/corpus.py's)")
    ap.add_argument("--config", type=Path, help="--corpus: train rtsort with this TOML config (rows 'rtsort:STEM')")
    ap.add_argument("--rtsort-only", action="store_true", help="--corpus: reuse every peer result, rerun rtsort's")
    ap.add_argument("--retry-failed", action="store_true", help="--corpus --reuse: rerun runs recorded as failed")
    ap.add_argument("--timeout", type=float, default=1800.0, help="--corpus: seconds per run (default 1800)")
    ap.add_argument("--jobs", type=int, default=2, help="--corpus: n_jobs given to the peers (default 2)")
    ap.add_argument("--md", type=Path, help="--corpus: write the table here instead of the default")
    ap.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # internal: one run in a child process
    args = ap.parse_args(argv)
    if args.job:
        return job_main(args.job)
    if args.corpus:
        return corpus_main(args, ap, argv)
    args.sorters = args.sorters or list(SORTERS)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.json"
    results = json.loads(store.read_text()) if args.reuse and store.exists() else {}
    for key in args.recordings:
        spec = RECORDINGS[key]
        folder = args.out / key
        if not (folder / "truth.npz").exists():
            simulate(folder, spec["n_channels"], spec["n_units"], args.duration, spec["seed"], spec["drift"],
                     noise_uV=spec["noise_uV"], progress=False)
        truth = np.load(folder / "truth.npz")
        for sorter in args.sorters:
            for name, seed in rows(sorter, args.seeds):
                if f"{key}/{name}" in results:
                    continue
                if sorter.startswith("rtsort"):
                    idx, lab, dt = run_rtsort(folder, "pca" if sorter == "rtsort-pca" else "transformer", seed)
                else:
                    idx, lab, dt = run_peer(folder, sorter)
                rep = sorting_accuracy(idx, lab, truth["sample_index"], truth["unit"], float(truth["sampling_rate"]))
                results[f"{key}/{name}"] = {**rep["summary"], "wall_s": dt, "recording": spec["label"],
                                            "accuracy": [u["accuracy"] for u in rep["units"]]}
                store.write_text(json.dumps(results, indent=1) + "\n")
                s = results[f"{key}/{name}"]
                print(f"{key} {name:<22s} well detected {s['well_detected']:>3d}/{s['n_true_units']:<3d} "
                      f"mean accuracy {s['mean_accuracy']:.3f}  {dt:7.1f} s", flush=True)
    print()
    print("| recording | sorter | well detected | mean accuracy | wall time |")
    print("|---|---|---:|---:|---:|")
    for key in args.recordings:
        for sorter in args.sorters:
            for name, _ in rows(sorter, args.seeds):
                s = results.get(f"{key}/{name}")
                if s:
                    print(f"| {key}: {s['recording']} | {name} | {s['well_detected']} / {s['n_true_units']} | "
                          f"{s['mean_accuracy']:.3f} | {s['wall_s']:.0f} s |")
    if len(args.seeds) > 1:
        print()
        print("| recording | sorter | well detected per seed | mean | mean accuracy per seed |")
        print("|---|---|---|---:|---|")
        for key in args.recordings:
            for sorter in (x for x in args.sorters if x.startswith("rtsort")):
                got = [results.get(f"{key}/{name}") for name, _ in rows(sorter, args.seeds)]
                if all(got):
                    well = " / ".join(str(g["well_detected"]) for g in got)
                    seeds = " / ".join(map(str, args.seeds))
                    mean = np.mean([g["well_detected"] for g in got])
                    acc = " / ".join(f"{g['mean_accuracy']:.3f}" for g in got)
                    print(f"| {key} | {sorter} | {well} (seeds {seeds}) | {mean:.1f} | {acc} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")



# ====================================================================== the development corpus
ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "docs" / "accuracy_results.json"  # every run behind docs/accuracy.md, written with it
MIN_SCORE_KEYS = ("well_detected", "n_true_units", "n_sorted_units", "mean_accuracy", "median_accuracy",
                  "false_positive_units")


def _corpus():
    import importlib.util

    if "rtsort_tools_corpus" not in sys.modules:
        spec = importlib.util.spec_from_file_location("rtsort_tools_corpus", Path(__file__).with_name("corpus.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return sys.modules["rtsort_tools_corpus"]


def rtsort_name(config: Path | None) -> str:
    return "rtsort" if config is None else f"rtsort:{config.stem}"


def corpus_rows(sorters, seeds, config):
    """(row name, sorter, seed) per run: rtsort's per training seed (seed 0 keeps the plain name)."""
    out = []
    for sorter in sorters:
        if sorter.startswith("rtsort"):
            base = rtsort_name(config) if sorter == "rtsort" else f"{rtsort_name(config)}-pca"
            out += [(base if seed == 0 else f"{base}@seed{seed}", sorter, seed) for seed in seeds]
        else:
            out.append((sorter, sorter, 0))
    return out


def job_main(job_file: Path) -> int:
    """Child process: one sorter run on one recording; writes spikes.npz and result.json beside the job."""
    job = json.loads(Path(job_file).read_text())
    work = Path(job["work"])
    result = work / "result.json"
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    try:
        folder = Path(job["recording"])
        info = {}
        if job["sorter"].startswith("rtsort"):
            from rtsort.config import load_config

            cfg = load_config(job.get("config"))
            if job["sorter"] == "rtsort-pca":
                cfg = Config.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "features": "pca"}})
            rec = open_recording(folder / "recording.bin")
            t0 = time.perf_counter()
            train_bundle(rec, work / "bundle", cfg, seed=job["seed"], progress=False)
            t1 = time.perf_counter()
            spikes, _ = sort_recording(rec, work / "bundle", progress=False)
            t2 = time.perf_counter()
            idx, lab = spikes["sample_index"], spikes["unit"]
            info = dict(wall_s=t2 - t0, train_s=t1 - t0, sort_s=t2 - t1)
        else:
            out = work / "sorter_output"
            idx, lab, dt = run_peer(folder, job["sorter"], out, job.get("n_jobs", 2))
            info = dict(wall_s=dt)
            if not job.get("keep_output"):
                shutil.rmtree(out, ignore_errors=True)
        np.savez(work / "spikes.npz", sample_index=np.asarray(idx, np.int64), unit=np.asarray(lab, np.int64))
        result.write_text(json.dumps({"status": "ok", **info}) + "\n")
        return 0
    except BaseException as exc:  # noqa: BLE001 - recorded, the parent goes on
        line = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        result.write_text(json.dumps({"status": "failed", "error": line}) + "\n")
        import traceback

        traceback.print_exc()
        return 1


def run_job(job: dict, timeout: float) -> dict:
    """Run ``job`` in a child process (its own process group) within ``timeout`` seconds."""
    work = Path(job["work"])
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "job.json").write_text(json.dumps(job, indent=1) + "\n")
    t0 = time.perf_counter()
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--job", str(work / "job.json")],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and the workers it started
            proc.wait()
            return {"status": "failed", "error": f"timed out after {timeout:.0f} s", "elapsed_s": timeout}
    elapsed = time.perf_counter() - t0
    try:
        res = json.loads((work / "result.json").read_text())
    except (OSError, ValueError):
        tail = [ln for ln in (work / "log.txt").read_text(errors="replace").splitlines() if ln.strip()]
        why = tail[-1][:300] if tail else ""
        res = {"status": "failed", "error": f"exit code {rc}" + (f": {why}" if why else "")}
    res["elapsed_s"] = elapsed
    return res


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import rtsort

    out = {"rtsort": rtsort.__version__}
    for pkg in ("spikeinterface", "mountainsort5", "torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rtsort"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        out["rtsort_git"] = rev + ("+uncommitted changes in rtsort/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def corpus_main(args, ap, argv) -> int:
    corpus = _corpus()
    half = corpus.ids_of(args.corpus)
    ids = list(args.ids or half)
    bad = [i for i in ids if i not in half]
    if bad:
        ap.error(f"not in the {args.corpus} half: {', '.join(bad)}")
    if args.config is not None and not args.config.is_file():
        ap.error(f"{args.config}: configuration file not found")
    if args.config is not None:
        from rtsort.config import load_config

        load_config(args.config)  # a bad config fails here, once, not in every run
    sorters = args.sorters or ["rtsort", *PEERS]
    if args.rtsort_only:
        args.reuse = True
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "corpus_results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    if args.reuse and PUBLISHED.exists():  # the runs behind docs/accuracy.md: peers need not run again
        for key, entry in json.loads(PUBLISHED.read_text()).items():
            results.setdefault(key, entry)
    rows = corpus_rows(sorters, args.seeds, args.config)
    config_sha = hashlib.sha256(args.config.read_bytes()).hexdigest()[:12] if args.config else None
    folders = corpus.ensure(ids, args.corpus_root, log=lambda m: print(m, flush=True))
    for rec_id, folder in zip(ids, folders):
        truth = np.load(folder / "truth.npz")
        for name, sorter, seed in rows:
            key = f"{rec_id}/{name}"
            old = results.get(key)
            is_rt = sorter.startswith("rtsort")
            if old is not None and args.reuse and not (args.rtsort_only and is_rt):
                if old.get("status") == "ok" or not args.retry_failed:
                    continue
            if args.rtsort_only and not is_rt:
                continue  # peers: only what is cached
            job = dict(recording=str(folder), sorter=sorter, seed=seed, work=str(args.out / "runs" / rec_id / name),
                       config=str(args.config.resolve()) if (args.config and is_rt) else None, n_jobs=args.jobs)
            print(f"{rec_id} {name:<22s} ...", end=" ", flush=True)
            res = run_job(job, args.timeout)
            entry = {"recording": rec_id, "sorter": sorter, "row": name, "seed": seed, "status": res["status"],
                     "date": datetime.datetime.now().isoformat(timespec="seconds"), "versions": _versions()}
            if is_rt and args.config:
                entry.update(config=str(args.config), config_sha256=config_sha)
            if res["status"] == "ok":
                spikes = np.load(Path(job["work"]) / "spikes.npz")
                rep = sorting_accuracy(spikes["sample_index"], spikes["unit"], truth["sample_index"], truth["unit"],
                                       float(truth["sampling_rate"]))
                entry.update({k: res[k] for k in ("wall_s", "train_s", "sort_s") if k in res})
                entry.update(rep["summary"])
                entry["accuracy"] = [u["accuracy"] for u in rep["units"]]
                print(f"well detected {entry['well_detected']:>3d}/{entry['n_true_units']:<3d} mean accuracy "
                      f"{entry['mean_accuracy']:.3f}  false-positive units {entry['false_positive_units']:>3d}  "
                      f"{entry['wall_s']:7.1f} s", flush=True)
            else:
                entry["error"] = res.get("error", "")
                entry["wall_s"] = res.get("elapsed_s")
                print(f"FAILED ({entry['error']})", flush=True)
            results[key] = entry
            store.write_text(json.dumps(results, indent=1) + "\n")
    if args.md:
        md_path = args.md
    elif args.corpus == "report" and set(ids) == set(half):
        md_path = ROOT / "docs" / "accuracy.md"
    else:
        md_path = args.out / f"accuracy_{args.corpus}.md"
    command = "python tools/compare.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    md = corpus_markdown(corpus, args.corpus, ids, rows, results, command, args)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    if md_path == ROOT / "docs" / "accuracy.md":  # the results behind the table, beside it
        keys = [f"{i}/{r[0]}" for i in ids for r in rows]
        PUBLISHED.write_text(json.dumps({k: results[k] for k in keys if k in results}, indent=1) + "\n")
    print(f"\nwrote {md_path}")
    return 0


def _fmt_entry(e) -> list:
    if e is None:
        return ["not run", "", "", "", ""]
    if e.get("status") != "ok":
        return [f"failed: {e.get('error', '')}", "", "", "", f"{e['wall_s']:.0f} s" if e.get("wall_s") else ""]
    wall = f"{e['wall_s']:.0f} s"
    if "train_s" in e:
        wall += f" ({e['train_s']:.0f} + {e['sort_s']:.0f})"
    return [f"{e['well_detected']} / {e['n_true_units']}", f"{e['mean_accuracy']:.3f}",
            str(e["false_positive_units"]), str(e["n_sorted_units"]), wall]


def _ok(e) -> bool:
    return e is not None and e.get("status") == "ok"


def corpus_markdown(corpus, half: str, ids, rows, results, command: str, args) -> str:
    rt_rows = [r for r in rows if r[1].startswith("rtsort")]
    peer_rows = [r for r in rows if not r[1].startswith("rtsort")]
    seeds = sorted({r[2] for r in rt_rows})
    got = [results.get(f"{i}/{r[0]}") for i in ids for r in rows]
    versions = next((e["versions"] for e in got if e and e.get("versions")), {})
    ncpu = os.cpu_count()
    out = [
        f"# Accuracy on the {half} half of the development corpus",
        "",
        "Generated by `tools/compare.py`; do not edit by hand: rerun the command below.",
        "",
        f"    {command}",
        "",
        f"Generated {datetime.date.today().isoformat()} on {platform.machine()} with {ncpu} cores; "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "Scoring: SpikeInterface's ground-truth comparison (`compare_sorter_to_ground_truth`, 0.4 ms, exhaustive "
        "ground truth). Accuracy per true unit = TP / (TP + FN + FP) against its best match; well detected = "
        "accuracy >= 0.8; false-positive units = sorted units that SpikeInterface matches to no true unit. "
        "Wall time on this machine: rtsort trains (default configuration"
        + (f" overridden by `{args.config}`" if args.config else "")
        + ") then sorts through the runtime pipeline, shown as total (train + sort); the peers run in "
        f"process with n_jobs={args.jobs} and their default parameters (spykingcircus2 corrects motion by "
        "default, tridesclous2 and lupin do not). Every run has its own process and a "
        f"{args.timeout:.0f} s limit. {KILOSORT4_NOTE}.",
        "",
    ]
    # ---- per drift kind
    kinds = [k for k in corpus.KINDS if any(corpus.SPECS[i].kind == k for i in ids)]
    out += ["## Per drift kind: rtsort against the best peer", "",
            "Well-detected units summed over the kind's recordings (rtsort: the mean over training seeds "
            f"{', '.join(map(str, seeds))}), and the mean of the recordings' mean accuracies. The best peer is "
            "the one with the most well-detected units on that kind.", "",
            "| drift kind | recordings | units | rtsort well detected | rtsort mean accuracy | best peer | "
            "its well detected | its mean accuracy |",
            "|---|---:|---:|---:|---:|---|---:|---:|"]
    for kind in kinds + ["all"]:
        rids = [i for i in ids if kind == "all" or corpus.SPECS[i].kind == kind]
        n_units = sum(corpus.SPECS[i].n_units for i in rids)
        rt_well, rt_acc, complete = [], [], True
        for seed in seeds:
            es = [results.get(f"{i}/{n}") for i in rids for n, s, sd in rt_rows if sd == seed and s == "rtsort"]
            if es and all(_ok(e) for e in es):
                rt_well.append(sum(e["well_detected"] for e in es))
                rt_acc.append(np.mean([e["mean_accuracy"] for e in es]))
            else:
                complete = False
        best = None
        for name, _, _ in peer_rows:
            es = [results.get(f"{i}/{name}") for i in rids]
            well = sum(e["well_detected"] if _ok(e) else 0 for e in es)
            acc = np.mean([e["mean_accuracy"] if _ok(e) else 0.0 for e in es])
            if best is None or (well, acc) > (best[1], best[2]):
                best = (name, well, acc, sum(not _ok(e) for e in es))
        label = "**all**" if kind == "all" else kind
        rt_w = f"{np.mean(rt_well):.1f}" if rt_well else "n/a"
        rt_w += "" if complete else " (incomplete)"
        rt_a = f"{np.mean(rt_acc):.3f}" if rt_acc else "n/a"
        if best:
            b_name = best[0] + (f" ({best[3]} failed / not run)" if best[3] else "")
            cells = [b_name, str(best[1]), f"{best[2]:.3f}"]
        else:
            cells = ["n/a", "", ""]
        out.append(f"| {label} | {len(rids)} | {n_units} | {rt_w} | {rt_a} | " + " | ".join(cells) + " |")
    out.append("")
    # ---- per recording
    out += ["## Per recording", ""]
    for rec_id in ids:
        s = corpus.SPECS[rec_id]
        out += [f"### {rec_id}", "",
                f"{s.n_channels} channels, {s.n_units} units, noise {s.noise_uV:g} uV, SNR {s.snr[0]:g}-{s.snr[1]:g}, "
                f"{s.layout} layout, {s.kind} ({corpus.drift_text(s)}), {s.duration_s / 60:g} min.", "",
                "| sorter | well detected | mean accuracy | false-positive units | sorted units | wall time |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, _, _ in rows:
            out.append(f"| {name} | " + " | ".join(_fmt_entry(results.get(f"{rec_id}/{name}"))) + " |")
        out.append("| kilosort4 | not run (needs a GPU to finish in reasonable time on this machine) | | | | |")
        for base in dict.fromkeys(r[0].split("@")[0] for r in rt_rows):
            es = [results.get(f"{rec_id}/{n}") for n, _, _ in rt_rows if n.split("@")[0] == base]
            es = [e for e in es if _ok(e)]
            if len(es) > 1:
                w = [e["well_detected"] for e in es]
                a = [e["mean_accuracy"] for e in es]
                out += ["", f"{base} over {len(es)} training seeds: well detected {min(w)}-{max(w)} (mean "
                            f"{np.mean(w):.1f}), mean accuracy {min(a):.3f}-{max(a):.3f} (mean {np.mean(a):.3f})."]
        out.append("")
    # ---- corpus spec
    out += [f"## The corpus ({half} half)", "",
            "Generated by `python tools/corpus.py --split " + half + "` (SpikeInterface's generators, fixed seeds; "
            "SNR = a unit's raw template peak over the noise level, spread evenly on a log scale over the range).",
            "", corpus.spec_table(ids), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
