"""Which architectures go through certify-zoo: one small variant of every timm module and every image-classification
class of every transformers model type, random weights, through the operations a conversion and an evaluation run.

Per architecture: load through certify-zoo (timm: saved in timm's format first; transformers: save_pretrained with a
ViT image processor), the conversion's forwards deterministic (eval mode), two Boot Camp steps with the paper's
estimator and an optimiser step each, rho at the held-out points, an inference-mode forward then a PGD input
gradient (the audit), save in the library's own format and load back to the same logits (to 1e-4). Random weights
say nothing about quality: this is about whether the machinery runs. Architectures whose default input is larger
than 320 px, or with more than 120 M parameters, are skipped (the CPU budget).

    PYTHONPATH=. python benchmarks/architectures.py --record docs/records/architectures.json [--work W]

``--only A,B`` runs those timm modules / transformers types; where ``--record`` exists, their rows replace its rows
(the others stay) and the provenance names them with this run's date and commit.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from certify_zoo.audit import PGDSettings, pgd_l2
from certify_zoo.forward_modes import batch_norms, set_conversion_mode
from certify_zoo.errors import CertifyZooError
from certify_zoo.models import load_classifier
from certify_zoo.models_transformers import image_classifier_classes
from certify_zoo.objective import ObjectiveSettings, boot_camp_step
from certify_zoo.smoothness import rho_at_probe_points

CLASSES = 5
MAX_PARAMETERS = 120e6
MAX_SIDE = 320  # px: Inception and Xception (299) run, 384 px and above are skipped
SECONDS_PER_MODEL = 150
# the smallest variant by name (timm lists several per module)
PREFERRED = ["atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "s0", "t0", "m0", "b0", "_18", "18",
             "lite0", "050", "100", "mobile", "_s", "b1"]


class Skipped(Exception):
    pass


def _timeout(*_):
    raise TimeoutError(f"over {SECONDS_PER_MODEL} s")


def timm_variant(module: str) -> str | None:
    import timm

    names = [n for n in timm.list_models(module=module) if not any(w in n for w in ("giant", "huge", "large"))]
    for part in PREFERRED:
        chosen = sorted((n for n in names if part in n), key=len)
        if chosen:
            return chosen[0]
    return min(names, key=len) if names else None


def build_timm(name: str, folder: Path) -> Path:
    import timm

    from certify_zoo.export import save_timm_model
    from certify_zoo.models import create_timm_model

    net = create_timm_model(name, pretrained=False, num_classes=CLASSES)
    size = timm.data.resolve_data_config({}, model=net)["input_size"]
    if max(size[1:]) > MAX_SIDE or sum(p.numel() for p in net.parameters()) > MAX_PARAMETERS:
        raise Skipped(f"input {size[1]}x{size[2]}" if max(size[1:]) > MAX_SIDE else "over 120 M parameters")
    net.pretrained_cfg = {**net.pretrained_cfg, "hf_hub_id": None, "url": None}
    save_timm_model(net.eval(), folder, [str(i) for i in range(CLASSES)])
    return folder


def build_transformers(model_class: str, folder: Path, model_type: str) -> Path:
    from transformers import AutoConfig, AutoModelForImageClassification, ViTImageProcessor

    labels = {i: f"c{i}" for i in range(CLASSES)}
    config = AutoConfig.for_model(model_type, num_labels=CLASSES, id2label=labels,
                                  label2id={v: k for k, v in labels.items()}, architectures=[model_class])
    net = AutoModelForImageClassification.from_config(config).eval()  # the class that `architectures` names
    size = getattr(config, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size.get("height", 224) if isinstance(size, dict) else size
    if size > MAX_SIDE or sum(p.numel() for p in net.parameters()) > MAX_PARAMETERS:
        raise Skipped(f"input {size}x{size}" if size > MAX_SIDE else "over 120 M parameters")
    net.save_pretrained(folder)
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def exercise(folder: Path, work: Path) -> dict:
    """The operations of a conversion and an evaluation on the model saved in ``folder``; raises on the first
    failure, with the stage in its message."""
    stage = "load"
    try:
        model = load_classifier(str(folder))
        stage = "conversion forwards"
        set_conversion_mode(model, "eval")
        base = copy.deepcopy(model).eval().requires_grad_(False)
        images = torch.rand(2, *model.input_size)
        with torch.no_grad():
            first, second = model(images), model(images)
        if not torch.equal(first, second) or first.shape != (2, CLASSES):
            raise AssertionError(f"forwards not deterministic or logits of shape {tuple(first.shape)}")
        stage = "Boot Camp steps"
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        for _ in range(2):
            parts = boot_camp_step(model, base, images, ObjectiveSettings(sigma=0.25, reps=2), gamma_weight=0.0005)
            optimizer.step()
            optimizer.zero_grad()
        stage = "rho"
        rho_at_probe_points(model, images, 0.25)
        stage = "audit"
        with torch.inference_mode():  # evaluate's forward; the attack then needs gradients through the same model
            prediction = model(images).argmax(-1)
        pgd_l2(model, images, prediction.clone(), torch.full((2,), 0.1), PGDSettings(steps=2, restarts=1),
               torch.Generator().manual_seed(0))
        stage = "save and load"
        model.save(work / "saved")
        again = load_classifier(str(work / "saved"))
        set_conversion_mode(again, "eval")
        with torch.no_grad():
            difference = float((again(images) - model(images)).abs().max())
        if difference > 1e-4:
            raise AssertionError(f"reloaded logits differ by {difference:.3g}")
        if not torch.isfinite(parts.loss):
            return {"result": "runs; loss not finite on random weights", "batch_norm_layers": len(batch_norms(model))}
        return {"result": "runs", "batch_norm_layers": len(batch_norms(model))}
    except CertifyZooError as exc:  # certify-zoo's own one-line refusal
        return {"result": f"refused at {stage}: {_line(exc, folder)}"}
    except Exception as exc:  # the table records it; the sweep goes on
        return {"result": f"fails at {stage}: {type(exc).__name__}: {_line(exc, folder)}"}


def _line(exc: Exception, folder: Path) -> str:
    """The message's first non-blank line (transformers' missing-backend errors start with a blank one), with the
    temporary folder named MODEL."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].replace(str(folder), "MODEL")[:200] if lines else ""


def sweep(library: str, names: list[str], work: Path) -> list[list[str]]:
    signal.signal(signal.SIGALRM, _timeout)
    rows = []
    # transformers: each image-classification class of a type is its own row, named in the config's `architectures`
    # (AutoModelForImageClassification.from_config cannot choose among a type's classes without it, transformers 5)
    pairs = ([(name, timm_variant(name)) for name in names] if library == "timm" else
             [(name, model_class) for name in names for model_class in image_classifier_classes()[name]])
    for name, model in pairs:
        if model is None:
            continue
        folder = Path(tempfile.mkdtemp(dir=work))
        signal.alarm(SECONDS_PER_MODEL)
        started = time.perf_counter()
        try:
            torch.manual_seed(0)
            if library == "timm":
                build_timm(model, folder / "model")
            else:
                build_transformers(model, folder / "model", name)
            outcome = exercise(folder / "model", folder)
        except Skipped as exc:
            outcome = {"result": f"skipped: {exc}"}
        except Exception as exc:  # the library itself cannot build it from its default config
            outcome = {"result": f"not built by {library}: {type(exc).__name__}: {_line(exc, folder)[:120]}"}
        finally:
            signal.alarm(0)
        rows.append([name, model, outcome["result"]])
        print(library, name, model, outcome["result"], f"{time.perf_counter() - started:.1f} s", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def main() -> None:
    import timm
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--only", default=None, help="comma-separated timm modules / transformers types (a check)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="architectures-"))
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    tables = {}
    for library, names in (("timm", timm.list_modules()),
                           ("transformers", sorted(image_classifier_classes()))):
        rows = sweep(library, [n for n in names if only is None or n in only], work)
        column = "timm module" if library == "timm" else "transformers model type"
        tables[library] = {"columns": [column, "model built", "result"], "rows": rows}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    today = datetime.date.today().isoformat()
    setup = (f"timm {timm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}; random "
             f"weights, {CLASSES} classes, 2 images at the default input size (skipped above {MAX_SIDE} px a side or "
             f"{MAX_PARAMETERS / 1e6:.0f} M parameters); steps: paper estimator, reps 2, sigma 0.25, effective gamma "
             "0.0005, SGD lr 1e-4")
    if only and args.record.exists():
        record = json.loads(args.record.read_text())
        for library, table in tables.items():  # a module's new rows stand where its first old row stood
            ran: dict[str, list] = {}
            for row in table["rows"]:
                ran.setdefault(row[0], []).append(row)
            rows = []
            for row in record[library]["rows"]:
                if row[0] not in ran:
                    rows.append(row)
                elif ran[row[0]]:
                    rows += ran[row[0]]
                    ran[row[0]] = []
            record[library]["rows"] = rows + [row for module_rows in ran.values() for row in module_rows]
        record["provenance"]["code"] += f"; rows {', '.join(sorted(only))} (--only): commit {commit}, {today}"
    else:
        record = {"provenance": {
            "date": today,
            "command": "PYTHONPATH=. python benchmarks/architectures.py --record docs/records/architectures.json",
            "code": f"commit {commit}", "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads"},
            **tables}
    record["provenance"]["setup"] = setup
    record["counts"] = {library: {kind.replace(" ", "_"): sum(row[2].startswith(kind)
                                                             for row in record[library]["rows"])
                                  for kind in ("runs", "refused", "fails", "skipped", "not built")}
                        for library in ("timm", "transformers")}
    args.record.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
