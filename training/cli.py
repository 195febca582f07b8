"""The offline commands: ``aeserve train``, ``aeserve eval``, ``aeserve models``, ``aeserve alias``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from aeserve.models.registry import check_name
from aeserve.models.storage import DEFAULT_REGISTRY, REGISTRY_VARIABLE
from aeserve.training.config import load_run_config
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError
from aeserve.training.data.rows import ModelRows
from aeserve.training.data.sources import load_dataset
from aeserve.training.distributed import process_group_from_env, spawn
from aeserve.training.evaluate import WORSE_THAN_PCA, bounded_sample, linear_probe, map_metric_rows, map_metrics, reconstruction_errors, worse_than_pca
from aeserve.training.preflight import (
    USER_ERRNOS,
    USER_ERRORS,
    not_a_directory,
    open_checked,
    os_error_line,
    reaching,
    stdout_closed,
    url_or_none,
    writable_folder,
)
from aeserve.training.recipes import inferred_notes, recipe_run_config, recipe_toml
from aeserve.training.report import REPORT_DIR, render_report
from aeserve.training.trainer import encode_all, project_codes, train

REGISTRY_HELP = f"a folder or a URL: s3://bucket/prefix, gs://bucket/prefix, file://... (default: ${REGISTRY_VARIABLE} or ./{DEFAULT_REGISTRY})"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a TOML config, or from --data with a recipe, and publish a new version")
    p.add_argument("config", nargs="?", help="training config (TOML); without one, --data picks a recipe")
    p.add_argument("--data", metavar="PATH", help="a table (.csv/.tsv/.parquet), an array (.npy/.npz) or an image folder; "
                   "without CONFIG a recipe is sized to it, with CONFIG it sets data.path")
    p.add_argument("--label", metavar="COLUMN", help="a table's label column, kept out of the features (sets data.label)")
    p.add_argument("--registry", help=REGISTRY_HELP)
    p.add_argument("--name", help="registry name (overrides the config's name)")
    p.add_argument("--seed", type=int, help="random seed (overrides train.seed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (DDP; or launch with torchrun)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its saved training state")
    p.add_argument("--state-dir", help="where the training state is saved after every epoch (default: a folder of this run's own "
                   "under .aeserve/state/NAME, named by its config and data)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("models", help="list names, versions, aliases and the headline metric")
    p.add_argument("--registry", help=REGISTRY_HELP)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("alias", help="point ALIAS at VERSION of NAME")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("alias")
    p.add_argument("--registry", help=REGISTRY_HELP)
    p.set_defaults(func=cmd_alias)

    p = sub.add_parser("export", help="write a version's encoder and decoder as ONNX models")
    p.add_argument("target", metavar="NAME[:VERSION]")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True, help="folder for encoder.onnx, decoder.onnx and export.json")
    p.add_argument("--registry", help=REGISTRY_HELP)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="re-measure a version on its held-out data, print its metrics, write a report")
    p.add_argument("target", metavar="NAME[:VERSION]")
    p.add_argument("--registry", help=REGISTRY_HELP)
    p.add_argument("--out", help="folder for the report (default: reports/NAME-VERSION)")
    p.set_defaults(func=cmd_eval)


# Fewer held-out rows than this behind the anomaly percentiles earns a note after training.
MIN_PERCENTILE_ROWS = 1000


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    # Before the data is read or anything is written: the name, the registry, the state folder. A bad one found only
    # at publishing costs the whole training.
    if args.config is None:
        if args.data is None:
            raise ValueError("aeserve train needs a config file (TOML) or --data PATH")
        config, name = None, args.name or Path(args.data).stem
    else:
        # With a config file, that file is the run: --data sets data.path and --label data.label, before any --set.
        given = [f"data.path={json.dumps(args.data)}"] if args.data is not None else []
        given += [f"data.label={json.dumps(args.label)}"] if args.label is not None else []
        config = load_run_config(not_a_directory(args.config, "a config file (TOML)"), given + args.overrides, name=args.name, seed=args.seed)
        name = config.name
    check_name(name)
    registry = open_checked(args.registry, name)
    # By default each run has its own state folder under this one (named by its config and data); --state-dir is one run's.
    state_dir, per_run = Path(args.state_dir or f".aeserve/state/{name}"), args.state_dir is None
    writable_folder(state_dir, "a writable folder for the training state (or give --state-dir)")
    dataset = None
    if config is None:  # a recipe sized to the data: reads it
        with reaching(args.data):
            config, dataset = recipe_run_config(args.data, args.label, args.overrides, name=name, seed=args.seed)
        if not args.quiet:
            print(f"recipe for {args.data} (a config: saved as a .toml file, `aeserve train FILE` trains it again):\n{recipe_toml(config)}",
                  file=sys.stderr)
        for line in inferred_notes(dataset.facts.get("inferred")):
            print(f"note: {line}", file=sys.stderr)
    with reaching(url_or_none(config.data.path), state_dir, registry.location):
        if args.nproc > 1:
            version = spawn(args.nproc, train, config, registry, not args.quiet, None, state_dir, args.resume, per_run)
        else:
            with process_group_from_env():  # a torchrun process group, when there is one
                version = train(config, registry, progress=not args.quiet, dataset=dataset, state_dir=state_dir, resume=args.resume,
                                per_run_state=per_run)
        if version is None:
            return 0  # not rank 0: rank 0 publishes and reports
        manifest = registry.manifest(config.name, version)
    m = manifest["metrics"]
    print(f"published {config.name}:{version} in {registry.location}  test_sq_err {m['test_sq_err']:.4g}  "
          f"test_mse {m['test_mse']:.4g}  pca_sq_err {m['pca_sq_err']:.4g}  ({manifest['training']['seconds']:.1f} s)")
    dropped = manifest["training"].get("dropped_rows")
    if dropped:
        print(f"note: {dropped['rows']} row(s) left out of training, for {dropped['why']}", file=sys.stderr)
    choice = manifest["training"].get("recipe_choice")
    if choice:
        chose = (f"closed-form PCA (kind pca, code size {manifest['code_dim']}) instead of the trained {choice['trained']}"
                 if choice["chosen"] == "pca" else f"the trained {choice['chosen']}, not closed-form PCA")
        print(f"recipe chose {chose}: {choice['why']}")
    if worse_than_pca(m):
        print(f"WARNING: {config.name}:{version} (kind {manifest['kind']}) is worse than closed-form PCA with the same code size on "
              f"held-out data: test_sq_err {m['test_sq_err']:.4g} against {m['pca_sq_err']:.4g} "
              f"({m['test_sq_err'] / m['pca_sq_err']:.2f} ×); train with model.kind = 'pca', or without model.kind "
              f"(train --data then publishes PCA unless the network is clearly better on validation)", file=sys.stderr)
    anomaly = manifest.get("anomaly", {})
    rows = anomaly.get("held_out_rows", m.get("error_quantiles_rows", MIN_PERCENTILE_ROWS))
    if rows < MIN_PERCENTILE_ROWS:
        print(f"note: the anomaly percentiles rest on {rows} rows ({anomaly.get('held_out', 'validation and test rows')}), "
              f"fewer than {MIN_PERCENTILE_ROWS:,}", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    registry = open_checked(args.registry)
    with reaching(registry.location):
        names = registry.names()
        if not names:
            print(f"no models in {registry.location}")
            return 0
        print(f"{'name':<24} {'version':>7} {'kind':<8} {'code':>4} {'test_sq_err':>11} {'pca_sq_err':>10} {'vs PCA':>12}  aliases")
        flagged = 0
        for name in names:
            by_version: dict[int, list[str]] = {}
            for alias, version in registry.aliases(name).items():
                by_version.setdefault(version, []).append(alias)
            for version in registry.versions(name):
                try:
                    manifest = registry.manifest(name, version)
                    m = manifest["metrics"]
                    worse = worse_than_pca(m)  # from the errors, so that versions published before the flag are flagged too
                    flagged += worse
                    ratio = f"{m['test_sq_err'] / m['pca_sq_err']:.3g}×" if m["pca_sq_err"] else "-"
                    row = (f"{manifest['kind']:<8} {manifest['code_dim']:>4} {m['test_sq_err']:>11.4g} {m['pca_sq_err']:>10.4g} "
                           f"{ratio + (' WORSE' if worse else ''):>12}")
                except (OSError, ValueError, KeyError, TypeError):
                    row = f"{'(unreadable manifest)':<50}"
                print(f"{name:<24} {version:>7} {row}  {','.join(sorted(by_version.get(version, [])))}")
        if flagged:
            print(f"WORSE: {flagged} version(s) with more held-out error than closed-form PCA with the same code size "
                  f"(more than {WORSE_THAN_PCA:g} × its test_sq_err)", file=sys.stderr)
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    registry = open_checked(args.registry)
    with reaching(registry.location):
        registry.set_alias(args.name, args.version, args.alias)
        print(f"{args.name}: {args.alias} -> {registry.resolve(args.name, args.alias)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from aeserve.models.export import export_onnx

    name, _, ref = args.target.partition(":")
    writable_folder(args.out, "a folder for the ONNX models (--out)")
    registry = open_checked(args.registry)
    with reaching(registry.location):
        version = registry.load(name, ref or "latest")
    for path in export_onnx(version, Path(args.out)):
        print(path)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    name, _, ref = args.target.partition(":")
    registry = open_checked(args.registry)
    with reaching(registry.location):
        loaded = registry.load(name, ref or "latest")
    out = Path(args.out or f"reports/{name}-{loaded.version}")
    writable_folder(out, "a folder for the report (--out)")
    manifest = loaded.manifest
    stored = manifest["metrics"]
    print(f"{name}:{loaded.version}  kind {manifest['kind']}  code_dim {loaded.code_dim}  input_shape {list(loaded.input_shape)}")
    rows = [("test_sq_err (stored)", stored["test_sq_err"]), ("test_mse (stored)", stored["test_mse"]),
            ("pca_sq_err (stored)", stored["pca_sq_err"])]
    report_path = probe = None
    data = DataConfig(**manifest["training"]["data"])
    with reaching(url_or_none(data.path), out):
        try:
            dataset = load_dataset(data)
            if int(np.prod(dataset.train_x.shape[1:])) != loaded.preprocessing.input_dim:
                raise DataError(f"{data.path or data.source}: its rows now hold {int(np.prod(dataset.train_x.shape[1:]))} values "
                                f"(shape {list(dataset.train_x.shape[1:])}); this version takes {loaded.preprocessing.input_dim}")
        except DataError as e:
            print(f"(cannot re-measure: {e})")
        else:
            if dataset.fingerprint != manifest["training"]["data_fingerprint"]:
                print("(warning: the data on disk differs from the data this version was trained on)")
            # Rows are scaled batch by batch as they are read (a memory-mapped split is never copied whole); what needs rows
            # at once (the map's neighbours, the probe) gets every row when they fit in memory, else a seeded sample.
            seed, dim = manifest["training"]["seed"], loaded.preprocessing.input_dim
            x_all, x_test = ModelRows(dataset.train_x, loaded.preprocessing), ModelRows(dataset.test_x, loaded.preprocessing)
            errors = reconstruction_errors(loaded.model, x_test)
            rows += [("test_sq_err (re-measured)", float(errors.mean())), ("test_mse (re-measured)", float(errors.mean()) / dim)]
            train_rows, test_rows = bounded_sample(np.arange(len(x_all)), dim, seed), bounded_sample(np.arange(len(x_test)), dim, seed)
            sampled = len(train_rows) < len(x_all)
            train_y = None if dataset.train_y is None else dataset.train_y[train_rows]
            test_y = None if dataset.test_y is None else dataset.test_y[test_rows]
            x_train, x_test_rows = x_all.subset(train_rows).tensor(), x_test.subset(test_rows).tensor()
            map_points = map_metric_rows(len(x_test_rows), sampled)
            map_now = map_metrics(project_codes(loaded.projector, encode_all(loaded.model, x_train)), train_y, x_test_rows[:map_points].numpy(),
                                  project_codes(loaded.projector, encode_all(loaded.model, x_test_rows)), test_y, map_points)
            rows += [(f"{key} (stored)", stored[key]) for key in sorted(map_now) if key in stored]
            rows += [(f"{key} (re-measured)", value) for key, value in sorted(map_now.items())]
            probe = linear_probe(loaded.model, x_train, train_y, x_test_rows, test_y, seed)
            for relative, data in render_report(loaded, dataset.test_x, dataset.test_y).items():
                target = out / Path(relative).relative_to(REPORT_DIR)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            report_path = out / "report.md"
    for label, value in rows:
        print(f"  {label:<34} {value:.5f}")
    ratio = stored["test_sq_err"] / stored["pca_sq_err"] if stored["pca_sq_err"] else float("nan")
    print(f"  {'ratio to PCA':<34} {ratio:.3f}")
    if probe is not None:
        print_probe(probe)
    if report_path:
        print(f"report: {report_path}")
    return 0


def print_probe(probe: dict) -> None:
    """The linear probe's test accuracies (training.evaluate.linear_probe) as a small table."""
    rows = probe["rows"]
    print(f"linear probe: {probe['settings']}; test accuracy on {rows['test']:,} held-out rows")
    few, every = f"<= {probe['per_class']}/class, {rows['per_class']:,} rows", f"all labels, {rows['all']:,} rows"
    print(f"  {'features':<12} {'dims':>5}  {few:>26}  {every:>26}")
    for name, result in probe["features"].items():
        print(f"  {name:<12} {result['dims']:>5}  {result['per_class']:>26.4f}  {result['all']:>26.4f}")


def run(args: argparse.Namespace) -> int:
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away is then noticed where it is handled
        return status
    except BrokenPipeError:
        return stdout_closed()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
