"""The zoo against the local Hub server: list published certified models, describe one, compare several."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from conftest import error_line, run_cli
from hub_server import TestHub
from test_publish import TOKEN, hub_env

SIGMAS = (0.25, 0.5, 1.0)
EVALUATION = dict(data="demo", method="all", n=100, max_images=40, seed=0)


@pytest.fixture(scope="module")
def hub():
    server = TestHub({TOKEN: "alice"})
    yield server
    server.close()


STORED_KAPPA = {0.25: 0.6, 0.5: 0.8}  # sigma 1 keeps what its self-check measured


@pytest.fixture(scope="module")
def variants(demo_base, tmp_path_factory) -> dict[float, Path]:
    """Three short conversions of the demo base at three sigmas, each certified at its own sigma."""
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.evaluation import EvaluateSettings, evaluate
    from certify_zoo.recipes import load_recipe

    root = tmp_path_factory.mktemp("variants")
    outputs = {}
    for sigma in SIGMAS:
        out = root / f"sigma-{sigma:g}"
        convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                            sigma=sigma, max_steps=3, gamma=2.0))
        if sigma in STORED_KAPPA:  # 3 steps leave no deterministic radius (kappa 0): two variants get one to list
            metadata = json.loads((out / "certify_zoo.json").read_text())
            metadata["calibration"] = {**metadata["calibration"], "kappa": STORED_KAPPA[sigma], "temperature": 1.0}
            (out / "certify_zoo.json").write_text(json.dumps(metadata))
        evaluate(EvaluateSettings(model=str(out), **EVALUATION))
        outputs[sigma] = out
    return outputs


@pytest.fixture(scope="module")
def published(hub, variants, tmp_path_factory) -> dict[float, str]:
    env = hub_env(hub, tmp_path_factory.mktemp("push-env"))
    repos = {}
    for sigma, folder in variants.items():
        repo_id = f"alice/digits-sigma-{sigma:g}"
        assert run_cli("push", repo_id, str(folder), env=env).returncode == 0
        repos[sigma] = repo_id
    return repos


def card_values(folder: Path) -> dict:
    """What the card's model-index carries: Monte-Carlo, and deterministic numbers only with an audit of their run and
    a radius the conversion did not withdraw (kappa 0)."""
    record = json.loads((folder / "certification.json").read_text())
    shown = {"monte_carlo"} | ({"deterministic", "deterministic_lipschitz"} if record.get("audit") else set())
    return {key: {f"{row['radius']:g}": round(100 * row["accuracy"], 2) for row in block["certified_accuracy"]}
            for key, block in record["certificates"].items()
            if key in shown and (block.get("calibration") or {}).get("kappa") != 0}


def test_list_shows_every_published_model_with_its_card_numbers(hub, variants, published, tmp_path):
    env = hub_env(hub, tmp_path)
    result = run_cli("list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    listed = {entry["repo_id"]: entry for entry in json.loads(result.stdout)}
    assert set(listed) == set(published.values())
    for sigma, repo_id in published.items():
        entry = listed[repo_id]
        assert entry["sigma"] == sigma and entry["architecture"] == "vit_tiny_patch16_224"
        assert entry["certified_accuracy"] == card_values(variants[sigma])
        record = json.loads((variants[sigma] / "certification.json").read_text())
        assert entry["clean_accuracy"] == round(100 * record["clean_accuracy"], 2)
        # evaluate audited the deterministic radii by default: the listing carries that audit, where a radius stands
        audited = {k: record["audit"][k] for k in ("attacked", "counterexamples")} if sigma in STORED_KAPPA else \
            None  # withdrawn (kappa 0): no deterministic claim was audited
        assert entry["audit"] == audited

    by_mc = json.loads(run_cli("list", "--json", "--sort", "monte-carlo@0.5", env=env).stdout)
    values = [e["certified_accuracy"]["monte_carlo"]["0.5"] for e in by_mc]
    assert values == sorted(values, reverse=True)
    by_det = json.loads(run_cli("list", "--json", "--sort", "deterministic@0.5", env=env).stdout)
    values = [e["certified_accuracy"].get("deterministic", {}).get("0.5") for e in by_det]
    present = [value for value in values if value is not None]
    assert len(present) == len(STORED_KAPPA) and values[:len(present)] == sorted(present, reverse=True)  # then '-'
    withdrawn = json.loads((variants[1.0] / "certification.json").read_text())["certificates"]["deterministic"]
    assert withdrawn["calibration"]["kappa"] == 0
    assert "deterministic" not in listed[published[1.0]]["certified_accuracy"]
    only = json.loads(run_cli("list", "--json", "--sigma", "0.5", env=env).stdout)
    assert [e["repo_id"] for e in only] == [published[0.5]]

    table = run_cli("list", "--search", "sigma-1", env={**env, "COLUMNS": "250"})
    assert table.returncode == 0 and published[1.0] in table.stdout and published[0.25] not in table.stdout


def test_list_against_a_failing_hub_is_one_line(hub, tmp_path):
    hub.state.fail_with = 500
    try:
        result = run_cli("list", env=hub_env(hub, tmp_path))
    finally:
        hub.state.fail_with = None
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "HTTP 500" in lines[0], result.stderr


def test_info_reads_records_without_weights(hub, variants, published, tmp_path):
    result = run_cli("info", published[0.25], env={**hub_env(hub, tmp_path), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "sigma 0.25" in result.stdout and "3 steps" in result.stdout and "PGD" in result.stdout
    said = " ".join(result.stdout.split())  # what the reported radius is, as the card says it
    assert "gamma: " in said and "reported deterministic radius: " in said and "kappa" in said
    repo = hub.state.repos[published[0.25]]
    fetched = [path for method, path in hub.state.requests if method == "GET" and repo.repo_id in path
               and "/resolve/" in path]
    assert fetched and not any(path.endswith(".safetensors") for path in fetched)


def test_info_offline_reads_the_cache_and_says_when_a_repo_is_not_there(hub, published, tmp_path):
    """Offline, or with the Hub unreachable, a repo not in the cache was said to have "no certify-zoo records": its
    first file's absence from the cache was read as the file's absence from the repo."""
    env = {**hub_env(hub, tmp_path), "COLUMNS": "200"}
    online = run_cli("info", published[0.5], env=env)
    assert online.returncode == 0, online.stderr
    offline = run_cli("info", published[0.5], env={**env, "HF_HUB_OFFLINE": "1"})  # from the cache it filled
    assert offline.returncode == 0 and offline.stdout == online.stdout, offline.stderr
    missing = run_cli("info", published[1.0], env={**env, "HF_HUB_OFFLINE": "1"})
    assert missing.returncode != 0 and "HF_HUB_OFFLINE is set and the files are not in the Hugging Face cache" \
        in error_line(missing.stderr)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens there once closed
    unreachable = run_cli("info", published[1.0], env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed}"})
    assert unreachable.returncode != 0 and "is unreachable" in error_line(unreachable.stderr)


def test_compare_equals_separate_evaluations(hub, variants, published, tmp_path):
    """Also without the workers the evaluations had (they do not change a certificate); the batch size is theirs
    (Monte-Carlo noise is seeded per batch)."""
    plot = tmp_path / "compare.png"
    models = [str(variants[0.25]), str(variants[0.5]), published[1.0]]
    result = run_cli("compare", *models, "--data", "demo", "--n", "100", "--max-images", "40", "--plot", str(plot),
                     "--workers", "0", "--json", env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    for model, sigma in zip(models, SIGMAS):
        separate = json.loads((variants[sigma] / "certification.json").read_text())
        assert records[model]["certificates"] == separate["certificates"]
        assert records[model]["sigma"] == sigma
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_compare_function_returns_what_compare_json_prints(variants, tmp_path):
    """certify_zoo.compare: the command's records by model, a model given twice told apart, keywords checked."""
    import io

    from rich.console import Console

    import certify_zoo
    from certify_zoo.errors import CertifyZooError

    models = [str(variants[0.25]), str(variants[0.5]), str(variants[0.25])]
    options = ("--method", "deterministic", "--max-images", "16", "--radii", "0.25,0.5")
    printed = run_cli("compare", *models, "--data", "demo", *options, "--json")
    assert printed.returncode == 0, printed.stderr
    quiet = Console(file=io.StringIO())
    returned = certify_zoo.compare(models, data="demo", method="deterministic", max_images=16, radii=(0.25, 0.5),
                                   console=quiet)
    assert list(returned) == [models[0], models[1], f"{models[0]} #2"]

    def measured(records: dict) -> dict:  # all but when each was made
        return {model: {**record, "created": None} for model, record in records.items()}
    assert measured(returned) == measured(json.loads(printed.stdout))
    with pytest.raises(CertifyZooError, match="^n must be at least 1, got 0$"):
        certify_zoo.compare(models, data="demo", n=0, console=quiet)
    with pytest.raises(CertifyZooError, match="compare has no setting 'max_image' \\(did you mean max_images"):
        certify_zoo.compare(models, data="demo", max_image=16, console=quiet)


def test_compare_names_each_row_apart_when_folders_share_a_name(variants, tmp_path):
    """runs/seed0/converted and runs/seed1/converted were both rows 'converted' in the table and curves 'converted' in
    the plot: now each row takes as many path parts as tell it apart; a Hub repo id stays as given."""
    import shutil

    from certify_zoo.zoo import compared_names

    seeds = [tmp_path / "runs" / f"seed{seed}" / "converted" for seed in (0, 1)]
    for folder in seeds:
        shutil.copytree(variants[0.25], folder)
    assert compared_names([str(seeds[0]), str(seeds[1]), "org/model", str(variants[0.5])]) == [
        "seed0/converted", "seed1/converted", "org/model", variants[0.5].name]
    assert compared_names([str(seeds[0]), str(seeds[0])]) == ["converted", "converted #2"]
    result = run_cli("compare", *map(str, seeds), "--data", "demo", "--method", "deterministic", "--max-images", "8",
                     env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    rows = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")]
    assert rows and set(rows) == {"seed0/converted", "seed1/converted"}, result.stdout
    twice = run_cli("compare", str(seeds[0]), str(seeds[0]), "--data", "demo", "--method", "deterministic",
                    "--max-images", "8", "--json")  # --json kept one of the two records under one key
    assert twice.returncode == 0, twice.stderr
    records = json.loads(twice.stdout)
    assert list(records) == [str(seeds[0]), f"{seeds[0]} #2"]
    assert records[str(seeds[0])]["certificates"] == records[f"{seeds[0]} #2"]["certificates"]


def test_compare_fetches_every_model_before_certifying_any(hub, variants, tmp_path):
    """A model that cannot be fetched stops compare before the others are certified (it had certified every model
    listed before it, then failed)."""
    result = run_cli("compare", str(variants[0.25]), "certified-org/no-such-model", "--data", "demo",
                     "--method", "deterministic", "--max-images", "8", env=hub_env(hub, tmp_path))
    assert result.returncode == 2 and "certified-org/no-such-model" in error_line(result.stderr), result.stderr
    assert "evaluate batch" not in result.stderr and "forward passes" not in result.stderr  # none certified


def test_compare_asks_for_sigma_before_certifying_any(variants, demo_base):
    """A model certify-zoo did not convert has no sigma of its own: compare stops before certifying the models listed
    before it (it had certified them, then failed on the last)."""
    result = run_cli("compare", str(variants[0.25]), str(demo_base), "--data", "demo", "--method", "deterministic",
                     "--max-images", "8")
    assert result.returncode == 2 and f"{demo_base} has no stored sigma" in error_line(result.stderr), result.stderr
    assert "--sigma" in error_line(result.stderr) and "forward passes" not in result.stderr  # none certified


def test_compare_writes_a_plot_only_where_plot_says(variants, tmp_path):
    here = tmp_path / "cwd"
    here.mkdir()
    result = run_cli("compare", str(variants[0.25]), "--data", "demo", "--method", "deterministic", "--max-images",
                     "8", cwd=here, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "Comparison: certified accuracy" in result.stdout and list(here.iterdir()) == []
