"""The model card: an output folder's records rendered through huggingface_hub's ModelCard and EvalResult.

Every number on a card comes from ``certification.json`` (measured by ``evaluate``) or ``certify_zoo.json``
(written by ``convert``); a model without a certification record gets a card that says it was not evaluated.
The metadata (YAML front matter and ``model-index``) carries the same numbers for machines, one metric per
certificate and radius, so that ``certify-zoo list`` and the Hub can read them back.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .certificate_names import (AUDITED, CERTIFICATE_LABELS, CERTIFICATE_MEANING, DETERMINISTIC, FROM_CHECK_DATA,
                                MIN_CALIBRATION_IMAGES, RAW_RADIUS_SOURCE, count_held_out, reach_clause,
                                reach_short_of, too_few_to_calibrate)
from .errors import CertifyZooError
from .export import CERTIFICATION_NAME, METADATA_NAME, atomic_file, read_json
from .wording import counted

CARD_NAME = "README.md"
PLOT_NAME = "certified_accuracy.png"
TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "certified_model.md"
ZOO_TAG = "certify-zoo"
TAGS = [ZOO_TAG, "certified-robustness", "randomized-smoothing", "adversarial-boot-camp", "image-classification"]
NOT_AUDITED = "not audited"


@dataclass
class OutputRecords:
    """What an output folder knows about itself, read without loading weights."""

    folder: Path
    metadata: dict[str, Any]  # certify_zoo.json
    certification: dict[str, Any]  # certification.json ({} when not evaluated)
    model_config: dict[str, Any]  # config.json
    base_certification: dict[str, Any]  # the base model's certification.json when evaluated alike, else {}
    base_folder: Path | None = None  # where base_certification was read (its per-image radii are there too)
    base_hub_id: str | None = None  # the base model's Hub repo, when it came from the Hub

    @property
    def library(self) -> str:
        return "transformers" if "architectures" in self.model_config else "timm"

    @property
    def architecture(self) -> str | None:
        if self.library == "transformers":
            return (self.model_config.get("architectures") or [None])[0]
        return self.model_config.get("architecture")


def read_output_records(folder: Path) -> OutputRecords:
    folder = Path(folder).expanduser()
    metadata = read_json(folder / METADATA_NAME)
    if not metadata:
        raise CertifyZooError(f"{folder} has no {METADATA_NAME}: it is not a certify-zoo output (run convert first)")
    certification = as_reported(read_json(folder / CERTIFICATION_NAME), metadata)
    base = str(metadata.get("base_model", ""))
    base_certification = base_certification_like(metadata, certification)
    return OutputRecords(folder, metadata, certification, read_json(folder / "config.json"), base_certification,
                         Path(base).expanduser() if base_certification else None,
                         hub_model_id(base) if base else None)


def as_reported(certification: dict, metadata: dict) -> dict:
    """The record as the card states it. Raw radii (evaluate's calibrated=False, for the studies) of a model whose
    calibration scales its radii are not what it reports: shown as the raw claim, out of the model-index (the card
    had shown them as its deterministic certificate)."""
    blocks = certification.get("certificates", {})
    raw = (blocks.get("deterministic", {}).get("calibration") or {}).get("source") == RAW_RADIUS_SOURCE
    stored = metadata.get("calibration") or {}  # read from the dict: the card stays torch-free
    if not raw or (float(stored.get("kappa", 1.0)), float(stored.get("temperature", 1.0))) == (1.0, 1.0):
        return certification
    reported = {key: block for key, block in blocks.items() if key not in DETERMINISTIC}
    return {**certification, "certificates": {**reported, "deterministic_raw": blocks["deterministic"]}}


def at_other_sigma(certification: dict, metadata: dict) -> bool:
    """Whether the record was measured at a sigma other than the conversion's (the one load and predict use)."""
    return metadata.get("sigma") is not None and certification.get("sigma") != metadata["sigma"]


def base_certification_like(metadata: dict, certification: dict) -> dict:
    """The base model's record when it was certified on the same data, sigma and radii (as the demo does)."""
    base = Path(str(metadata.get("base_model", ""))).expanduser()
    if not certification or not (base / CERTIFICATION_NAME).is_file():
        return {}
    record = read_json(base / CERTIFICATION_NAME)
    same = all(record.get(key) == certification.get(key) for key in ("data", "sigma", "radii", "num_images"))
    return record if same else {}


def published_records(records: OutputRecords, repo_id: str) -> OutputRecords:
    """The records as pushed to ``repo_id``: no local path (see ``public``); the comparison with the base stays."""
    from .public import public_records

    public = public_records(records.folder, repo_id)
    return OutputRecords(records.folder, public.get(METADATA_NAME, records.metadata),
                         as_reported(public.get(CERTIFICATION_NAME, records.certification), records.metadata),
                         public.get("config.json", records.model_config), records.base_certification,
                         records.base_folder, records.base_hub_id)


def dataset_of(data_spec: str, on_conversion_images: bool = False) -> dict[str, str]:
    """model-index dataset fields for a DATA spec; a folder the conversion trained on is its train split, not a test
    split."""
    if data_spec == "demo":
        return {"name": "scikit-learn digits (8x8, held-out split)", "type": "digits", "split": "test"}
    if data_spec.startswith("hf:"):
        name, _, split = data_spec[3:].partition(":")
        return {"name": name, "type": name, "split": split or ("train" if on_conversion_images else "validation")}
    return {"name": Path(data_spec).name or data_spec, "type": "imagefolder",
            "split": "train" if on_conversion_images else "test"}


def hub_model_id(spec: str) -> str | None:
    """The Hub id of a MODEL spec when it names one (for base_model); local folders have none."""
    spec = spec.removeprefix("hf-hub:")
    if Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~")):
        return None
    if "/" not in spec or spec.startswith("timm/"):  # a timm registry name: the Hub repo of its pretrained tag
        from timm.models import get_pretrained_cfg

        try:
            cfg = get_pretrained_cfg(spec.removeprefix("timm/"))
        except Exception:  # unknown to this timm version: say nothing rather than guess
            return None
        return cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else None
    return spec if spec.count("/") == 1 else None


def audit_of(certification: dict) -> dict | None:
    """The adversarial audit of the deterministic radii, when evaluate ran one (``evaluate --audit``)."""
    audit = certification.get("audit")
    if not isinstance(audit, dict):
        return None
    counterexamples = audit.get("counterexamples")
    return {"attacked": audit.get("attacked", audit.get("images_attacked")),
            "counterexamples": len(counterexamples) if isinstance(counterexamples, list) else counterexamples,
            "statement": audit.get("statement") or f"{counted(counterexamples, 'counterexample')} found by "
                                                    f"{audit.get('attack', 'the attack')}"}


def metric_name(certificate: str, radius: float, audit: dict | None) -> str:
    label = CERTIFICATE_LABELS[certificate]
    if certificate in DETERMINISTIC:
        suffix = (f"{counted(audit['counterexamples'], 'PGD counterexample')} in {counted(audit['attacked'], 'image')}"
                  if audit and certificate in AUDITED else NOT_AUDITED)
        return f"certified accuracy @ L2 {radius:g} ({label}, {suffix})"
    return f"certified accuracy @ L2 {radius:g} ({label})"


def withdrawn(block: dict) -> bool:
    """Whether a record (certify_zoo.json, or a certificate's block) carries a calibration that withdrew the radius
    (``Calibration.withdrawn``, read from the dict: the card stays torch-free for push and list)."""
    return (block.get("calibration") or {}).get("kappa") == 0


def percent(fraction: float) -> float:
    """Fractions in the records become percent on the card, rounded to what the data can tell apart."""
    return round(100.0 * fraction, 2)


def eval_results(certification: dict) -> list:
    """One EvalResult per certificate and radius, plus clean accuracy and ACR: the card's model-index."""
    from huggingface_hub import EvalResult

    dataset = dataset_of(certification["data"], certification.get("on_conversion_images", False))
    audit = audit_of(certification)
    common = dict(task_type="image-classification", task_name="Certified image classification",
                  dataset_type=dataset["type"], dataset_name=dataset["name"], dataset_split=dataset["split"])
    base_args = {"sigma": certification["sigma"], "norm": certification.get("norm", "l2"),
                 "num_images": certification["num_images"], "space": certification.get("space")}
    results = [EvalResult(**common, metric_type="accuracy", metric_name="clean accuracy (top-1)",
                          metric_value=percent(certification["clean_accuracy"]),
                          metric_args={"num_images": certification["num_images"]})]
    for key, label in CERTIFICATE_LABELS.items():
        block = certification["certificates"].get(key)
        if block is None or (key in DETERMINISTIC and not (audit and key in AUDITED)) or withdrawn(block):
            continue  # a deterministic number enters the model-index only with its audit (and its kappa), and a
            # withdrawn radius (kappa 0) claims nothing
        args = {**base_args, "certificate": key}
        if key == "monte_carlo":  # it may have run on a check subsample of the images
            args.update({k: block[k] for k in ("n0", "n", "alpha", "abstentions") if k in block})
            args["num_images"] = block.get("images", args["num_images"])
        if key in DETERMINISTIC:
            args["bound"] = block.get("bound")
            args["audit"] = {"attacked": audit["attacked"], "counterexamples": audit["counterexamples"]}
            args["kappa"] = block.get("calibration", {}).get("kappa", 1.0)
            args["temperature"] = block.get("calibration", {}).get("temperature", 1.0)
        for row in block["certified_accuracy"]:
            results.append(EvalResult(**common, metric_type="certified_accuracy",
                                      metric_name=metric_name(key, row["radius"], audit),
                                      metric_value=percent(row["accuracy"]),
                                      metric_args={**args, "radius": row["radius"]}))
        results.append(EvalResult(**common, metric_type="average_certified_radius",
                                  metric_name=f"average certified radius ({label})",
                                  metric_value=round(block["acr"], 4),
                                  metric_args=args))
    return results


def conversion_settings(metadata: dict) -> dict[str, Any]:
    """The settings a reader needs to reproduce the conversion, as stored by convert."""
    settings = metadata.get("settings", {})
    keep = ("recipe", "epochs", "max_steps", "batch_size", "lr", "lr_min", "momentum", "weight_decay", "warmup",
            "precision", "grad_accum", "seed", "deterministic", "bn_mode")
    return {"objective": settings.get("objective", {}), **{k: settings[k] for k in keep if k in settings},
            "effective_gamma": metadata.get("effective_gamma"), "steps": metadata.get("steps"),
            "images_seen": metadata.get("images_seen"), "data": metadata.get("data")}


def card_data(records: OutputRecords, repo_id: str | None = None):
    """The YAML front matter: Hub conventions plus a ``certify_zoo`` block a machine can read back."""
    from huggingface_hub import ModelCardData

    metadata, certification = records.metadata, records.certification
    pretrained_cfg = records.model_config.get("pretrained_cfg", {})
    base = str(metadata.get("base_model", ""))
    data_spec = str(metadata.get("data", ""))
    zoo = {"method": metadata.get("method", "adversarial-boot-camp"),
           "paper": metadata.get("paper", "arXiv:2010.02508"),
           "base_model": base, "architecture": records.architecture, "sigma": metadata.get("sigma"),
           "input_size": metadata.get("input_size"), "num_classes": metadata.get("num_classes"),
           "conversion": conversion_settings(metadata), "evaluated": bool(certification),
           "certify_zoo_version": metadata.get("certify_zoo_version")}
    if certification:
        zoo["certificates"] = [key for key in CERTIFICATE_LABELS if key in certification.get("certificates", {})]
        zoo["audit"] = audit_of(certification) or NOT_AUDITED
    model_name = repo_id.split("/")[-1] if repo_id else records.folder.name
    return ModelCardData(
        license=pretrained_cfg.get("license") or records.model_config.get("license"),
        library_name=records.library,
        pipeline_tag="image-classification",
        tags=list(TAGS),
        base_model=records.base_hub_id,
        datasets=[data_spec[3:].partition(":")[0]] if data_spec.startswith("hf:") else None,
        model_name=model_name if certification else None,
        eval_results=eval_results(certification) if certification else None,
        certify_zoo=zoo,
    )


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def table_rows(name: str, certification: dict) -> list[dict[str, Any]]:
    """The card's rows of one record: only certificates (an unconverted model's one-pass radii certify nothing)."""
    rows = []
    for key, label in CERTIFICATE_LABELS.items():
        block = certification["certificates"].get(key)
        if block is None or (key in DETERMINISTIC and not certification.get("converted_by_certify_zoo", True)):
            continue
        extra = " withdrawn (kappa 0)" if withdrawn(block) else ""
        if key == "monte_carlo":
            subsample = block.get("images", certification["num_images"]) != certification["num_images"]
            reach = reach_short_of(block, certification["sigma"], certification["radii"])
            extra = (f" (n = {block['n']}, alpha = {block['alpha']}"
                     + (f", on {block['images']} of the images" if subsample else "")
                     + (f"; {reach_clause(reach)}" if reach is not None else "") + ")")
        by_radius = {round(row["radius"], 6): row["accuracy"] for row in block["certified_accuracy"]}
        rows.append({"model": name, "certificate": label + extra,
                     "clean": f"{percent(certification['clean_accuracy']):.1f}",
                     "cells": [f"{percent(by_radius[round(r, 6)]):.1f}" if round(r, 6) in by_radius else "-"
                                for r in certification["radii"]],
                     "acr": f"{block['acr']:.3f}"})
    return rows


def _unseen(calibration: dict) -> bool:
    # --check-data: images the base never trained on; otherwise a slice of the conversion data, often the base's own
    # training images, on which a calibration can promise more than holds on unseen images (docs: certificates)
    return calibration.get("images_from") == FROM_CHECK_DATA


def _held_out_images(calibration: dict) -> str:
    return "--check-data images" if _unseen(calibration) else "conversion images held out of training"


def _withdrawal_reason(metadata: dict) -> str:
    """Why the self-check reported kappa 0: too few held-out images, or a raw radius that overclaimed on them."""
    calibration, check = metadata.get("calibration") or {}, metadata.get("self_check")
    if not check:  # no image was set aside (convert stores kappa 0), or a record edited or cut short
        if calibration.get("images") == 0:
            return too_few_to_calibrate(0, calibration.get("min_images", MIN_CALIBRATION_IMAGES))
        return "no self-check record says why"
    if check["held_out_images"] < calibration.get("min_images", 0):
        return too_few_to_calibrate(check["held_out_images"], calibration["min_images"])
    return (f"on the {_held_out_images(calibration)} the raw radius overclaimed more than "
            f"{1 / calibration.get('withdrawn_below', 0.3):.0f}x")


def withdrawal_text(metadata: dict, command: str = "certify-zoo evaluate MODEL --method monte-carlo") -> str:
    """The one sentence evaluate, predict, certify_zoo.load and the card say about a model whose conversion withdrew
    its deterministic radius (``withdrawn``): why, and what certifies it instead."""
    return (f"This model's conversion withdrew its deterministic radius (kappa 0: {_withdrawal_reason(metadata)}): "
            f"every deterministic radius it reports is 0, and the Monte-Carlo certificate certifies it (`{command}`).")


def agreement_text(metadata: dict) -> str:
    """The student's top-1 agreement with the base at the end of its conversion: on its last clean training images
    (near 100% on images it trains on) and, where the self-check ran, on the held-out images."""
    parts = []
    if isinstance(metadata.get("final_agreement_with_base"), (int, float)):
        parts.append(f"{100 * metadata['final_agreement_with_base']:.1f}% on its last clean training images")
    check = metadata.get("self_check") or {}
    if isinstance(check.get("agreement_with_base"), (int, float)):
        parts.append(f"{100 * check['agreement_with_base']:.1f}% on {count_held_out(check['held_out_images'])}")
    return "; ".join(parts) or "-"


def calibration_text(metadata: dict) -> str:
    """How the deterministic radius was calibrated, and on what (certify_zoo.json's self-check)."""
    calibration, check = metadata.get("calibration"), metadata.get("self_check")
    if calibration and calibration["kappa"] == 0:
        return f"no deterministic radius is reported (kappa 0): {_withdrawal_reason(metadata)}"
    if not calibration or not check:  # a conversion by a version that stored no calibration
        return "none: radii are the raw sigma/2 (PhiInv(p1) - PhiInv(p2)) (no calibration stored)"
    held_out = _held_out_images(calibration)
    rho, audit = check["rho"], check["audit"]
    temperature = calibration.get("temperature", 1.0)
    return (f"kappa {fmt(calibration['kappa'])}"
            + (f" at softmax temperature {fmt(temperature)}" if temperature != 1.0 else "")
            + ": every deterministic radius reported is kappa x sigma/2 (PhiInv(p1) - PhiInv(p2))"
            + (" of softmax(logits / temperature)" if temperature != 1.0 else "") + ". Measured "
            f"at the end of conversion on {check['held_out_images']} {held_out} (labels: "
            f"the student's own predictions): PGD ({audit['steps']} steps, {audit['restarts']} restarts) broke "
            f"{audit['counterexamples_within_raw_radius']} of {audit['attacked']} raw claims (witness "
            f"{fmt(calibration['by_pgd'])}, with margin {fmt(calibration['margin'])}); "
            f"rho median {fmt(rho['median'])}, "
            f"99th percentile {fmt(rho['p99'])}, max {fmt(rho['max'])} (witness 1 / max rho = "
            f"{fmt(calibration['by_rho'])})"
            + (f". kappa leaves every held-out radius unbroken by the evaluation's attack, so on images drawn like "
               f"them at most {calibration['broken_share_bound']:.1%} of claims (1 / (held-out images + 1)) are "
               "expected to be broken by it" if "broken_share_bound" in calibration else "")
            + ("" if _unseen(calibration) else
               ". If the base was trained on the conversion images, unseen images can break more claims than that; "
               "--check-data calibrates on images it never saw"))


def controller_text(gamma: dict) -> str:
    """What the rho controller did, for the objective row: its final value, and the breaches it undid."""
    if gamma.get("mode") != "auto":
        return ""
    restorations = gamma.get("restorations", 0)
    floor = gamma.get("controller", {}).get("agreement_floor")
    return (" (final value of the rho controller" + (
        f"; {counted(restorations, 'time')} the student's agreement with the base fell below the floor {fmt(floor)} "
        "and it went back to its last good state" if restorations else "") + (
        "; the last went back to step 0: no step of the conversion is kept, the weights are the base's"
        if gamma.get("undone_entirely") else "") + ")")


def learning_rate_text(metadata: dict) -> str:
    """The learning rate the conversion used (the recipe's lr is stated at a reference batch and scaled to the
    global batch), and the batch it was used at."""
    settings, scale_out = metadata.get("settings", {}), metadata.get("scale_out") or {}
    if "peak_lr" not in scale_out:  # records written before the scaled lr was kept
        return (f"lr {fmt(settings.get('lr'))} -> {fmt(settings.get('lr_min'))}, batch "
                f"{fmt(settings.get('batch_size'))}")
    stated = (f" ({fmt(settings.get('lr'))} stated at batch {fmt(settings.get('reference_batch'))}, "
              f"{settings.get('lr_scaling')} scaling)" if scale_out["peak_lr"] != settings.get("lr") else "")
    return (f"lr {fmt(scale_out['peak_lr'])} -> {fmt(scale_out.get('lr_min'))}{stated}, global batch "
            f"{fmt(scale_out.get('global_batch'))} ({counted(fmt(scale_out.get('processes')), 'process')} x "
            f"{fmt(settings.get('batch_size'))} x {fmt(settings.get('grad_accum', 1))} accumulation)")


def lr_scale_text(gamma: dict) -> str:
    """The rho controller's largest factor on the learning rate (AdamW), for the optimiser row; "" when it never
    moved the lr."""
    largest = max((entry.get("lr_scale", 1.0) for entry in gamma.get("trajectory", [])), default=1.0)
    return (f", lr raised by the rho controller up to {fmt(largest)}x the schedule (it ended at "
            f"{fmt(gamma['trajectory'][-1].get('lr_scale', 1.0))}x)" if largest > 1 else "")


def template_values(records: OutputRecords, repo_id: str | None) -> dict[str, Any]:
    metadata, certification = records.metadata, records.certification
    settings = metadata.get("settings", {})
    objective = settings.get("objective", {})
    hardware = metadata.get("hardware", {})
    base = str(metadata.get("base_model", "?"))
    input_size = metadata.get("input_size") or records.model_config.get("pretrained_cfg", {}).get("input_size")
    objective_text = ", ".join(f"{k} {fmt(v)}" for k, v in objective.items())
    conversion_rows = [
        ("base model", f"`{base}`" + (f" ({records.architecture})" if records.architecture else "")),
        ("sigma (pixel L2 noise)", fmt(metadata.get("sigma"))),
        ("objective", f"{objective_text}; effective gamma {fmt(metadata.get('effective_gamma'))}"
                      + controller_text(metadata.get("gamma", {}))),
        ("optimiser", f"{str(settings.get('optimizer', 'sgd')).upper()} {learning_rate_text(metadata)}, momentum "
                      f"{fmt(settings.get('momentum'))}, weight decay {fmt(settings.get('weight_decay'))}, warm-up "
                      f"{fmt(settings.get('warmup'))}, precision {fmt(settings.get('precision'))}"
                      + (f", gradient norm clipped at {fmt(settings['clip_grad_norm'])}"
                         if settings.get("clip_grad_norm") else "")
                      + lr_scale_text(metadata.get("gamma", {}))),
        ("data (labels not read)", f"`{metadata.get('data', '?')}`"),
        ("steps / images seen", f"{fmt(metadata.get('steps'))} / {fmt(metadata.get('images_seen'))}"),
        ("agreement with base's top-1 at the end", agreement_text(metadata)),
        ("calibration of the deterministic radius", calibration_text(metadata)),
        ("hardware", f"{counted(hardware.get('processes', 1), 'process')} on {hardware.get('device', '?')}, "
                     f"torch {hardware.get('torch', '?')}"),
        ("time", f"{fmt(metadata.get('seconds'))} s"),
        ("recipe / seed", f"{settings.get('recipe', '-')} / {settings.get('seed', '-')}"),
    ]
    evaluation = None
    if certification:
        audit = audit_of(certification)
        rows = table_rows("this model", certification)
        if records.base_certification:
            rows += table_rows("base (unconverted)", records.base_certification)
        base_audit = audit_of(records.base_certification)
        evaluation = {"dataset": dataset_of(certification["data"])["name"],
                      "images": counted(certification["num_images"], "image"),
                      "base_not_certified": not records.base_certification.get("converted_by_certify_zoo", True),
                      "base_audit": base_audit["statement"] if base_audit else None,
                      "skipped": certification.get("skipped_images", 0), "sigma": certification["sigma"],
                      "on_conversion_images": certification.get("on_conversion_images", False),
                      "other_sigma": at_other_sigma(certification, metadata),
                      "radii": [f"{r:g}" for r in certification["radii"]], "rows": rows,
                      "audit": audit["statement"] if audit else None,
                      "plot": PLOT_NAME if (records.folder / PLOT_NAME).is_file() else None}

    shown = certification.get("certificates", {}) if certification else {}
    meanings = [(label, CERTIFICATE_MEANING[key])
                for key, label in CERTIFICATE_LABELS.items() if key != "deterministic_raw" or key in shown]
    hw = "x".join(map(str, input_size[1:])) if input_size else "H x W"
    command = evaluate_command(repo_id or str(records.folder))
    return {"title": repo_id or records.folder.name,
            "base_description": f"`{base}`",
            "sigma": fmt(metadata.get("sigma")), "input_size": "x".join(map(str, input_size)) if input_size else "?",
            "input_hw": hw, "input_channels": input_size[0] if input_size else 3,
            "conversion_rows": conversion_rows, "evaluation": evaluation,
            "certificate_meanings": meanings, "library": records.library,
            # what the card's commands and code name, quoted for a shell and as Python strings: a folder may hold
            # spaces ("my models/x": the command split in two) or backslashes (a Windows path in a Python string)
            "local_name": shlex.quote(records.folder.name),
            "timm_spec": python_string(f"hf-hub:{repo_id}" if repo_id else f"local-dir:{records.folder}"),
            "load_spec": python_string(repo_id or str(records.folder)),
            "load_command": command,
            "withdrawal": withdrawal_text(metadata, f"{command} --method monte-carlo")
            if withdrawn(metadata) else None}


def evaluate_command(model: str, data: str = "DATA") -> str:
    """`certify-zoo evaluate MODEL --data DATA`, quoted for a shell: a folder may hold spaces or quotes."""
    return f"certify-zoo evaluate {shlex.quote(model)} --data {shlex.quote(data)}"


def python_string(text: str) -> str:
    """``text`` as a Python string literal in double quotes (json's escapes are Python's for these)."""
    return json.dumps(text, ensure_ascii=False)


def render_card(folder: Path, repo_id: str | None = None):
    """The ModelCard of an output folder (validated metadata, Jinja body), for a Hub repo id when given."""
    from huggingface_hub import ModelCard

    records = read_output_records(folder)
    if repo_id is not None:  # what leaves the machine names no local path
        records = published_records(records, repo_id)
    return ModelCard.from_template(card_data(records, repo_id), template_path=str(TEMPLATE_PATH),
                                   **template_values(records, repo_id))


def write_card(folder: Path, repo_id: str | None = None, destination: Path | None = None) -> Path:
    """Regenerate README.md from the records (atomically); returns its path."""
    path = Path(destination or Path(folder) / CARD_NAME)
    text = str(render_card(folder, repo_id))
    with atomic_file(path) as temp:  # a reader never sees half a card
        temp.write_text(text, encoding="utf-8")
    return path


def refresh_outputs(folder: Path) -> list[Path]:
    """After convert or evaluate: redraw the plot (when evaluated) and regenerate README.md from the records."""
    from .plot import records_plot

    records = read_output_records(folder)
    written = []
    if records.certification:
        models = [("converted", records.certification, records.folder, False)]
        if records.base_certification:
            models.append(("base", records.base_certification, records.base_folder, True))
        written.append(records_plot(models, records.folder / PLOT_NAME))
    written.append(write_card(records.folder))
    return written
