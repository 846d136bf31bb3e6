"""The docs cannot go stale: every rendered region equals what its record gives, and the README stays short."""
from __future__ import annotations

import re

from conftest import REPO

README = REPO / "README.md"


def test_every_region_equals_what_its_record_gives(render):
    stale = [f"{region.page.relative_to(REPO)}: record:{region.name} {region.view}"
             for path in render.pages() for region in render.render_page(path, write=False) if region.stale]
    assert not stale, "pages differ from their records; run `python scripts/render_docs.py`: " + "; ".join(stale)


def test_one_changed_number_in_a_page_is_caught(render):
    page = REPO / "docs" / "studies" / "estimator-study.md"
    text = page.read_text()
    region = next(m for m in render.REGION.finditer(text) if re.search(r"\d", m["body"]))
    digit = re.search(r"\d", region["body"])
    position = region.start("body") + digit.start()
    changed = text[:position] + str((int(digit.group()) + 1) % 10) + text[position + 1:]  # one digit, one region
    _, regions = render.render_text(changed, render.Page(page))
    assert [(r.name, r.view) for r in regions if r.stale] == [(region["name"], region["view"])]
    _, regions = render.render_text(text, render.Page(page))
    assert not any(r.stale for r in regions)


def test_examples_in_code_blocks_are_not_regions(render):
    example = "```markdown\n<!-- record:no_such_record table -->\nx\n<!-- /record -->\n```\n"
    assert render.render_text(example, render.Page(REPO / "docs" / "x.md")) == (example, [])


def test_every_region_names_a_record_and_every_record_is_used(render):
    used = {region.name for path in render.pages() for region in render.render_page(path, write=False)}
    committed = {path.stem for path in render.RECORDS.glob("*.json")}
    assert committed <= used, f"records no page renders: {sorted(committed - used)}"
    assert used - committed <= {"recipes"}  # the recipes the package ships; every other region has its record


def test_readme_is_short_and_opens_with_the_two_commands_and_the_demo_table():
    lines = README.read_text().splitlines()
    assert len(lines) <= 220
    head = "\n".join(lines[:40])
    assert "pip install -e . && certify-zoo demo" in head and "&& python -m pytest" in head
    table = head.index("<!-- record:demo table -->")
    assert "Monte-Carlo" in head[table:] and "<!-- /record -->" in head[table:]  # the whole sample, rendered


def test_ci_runs_the_readme_test_command_and_the_strict_docs_build():
    command = next(line for line in README.read_text().splitlines() if "&& python -m pytest" in line)
    install = command.split("&&")[0].strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert f"python -m {install}" in ci and "python -m pytest" in ci and "mkdocs build --strict" in ci


def test_no_measured_ratio_is_typed_outside_a_region(render):
    typed = re.compile(r"\d+\.\d+x\b|±|\d+(?:\.\d+)?-\d+(?:\.\d+)?x\b")
    for path in render.pages():
        outside = render.REGION.sub("", path.read_text())
        assert not typed.findall(outside), f"{path.relative_to(REPO)}: {typed.findall(outside)}"


def test_gamma_study_view_averages_a_record_in_the_scripts_layout(render):
    """The gamma study's page is added with its record (benchmarks/gamma_study.py writes it); its view is ready."""
    def run(seed, clean, kappa, broken):
        at = {"0.25": clean - 0.2, "0.5": clean - 0.4}
        return {"model": "demo", "seed": seed, "tag": "defaults", "recipe": "demo", "kappa": kappa, "clean": clean,
                "base_clean": 0.9, "mc": at, "base_mc": at, "det_calibrated": at, "det_raw": at,
                "pgd_calibrated": {"attacked": 100, "counterexamples": broken},
                "pgd_raw": {"attacked": 100, "counterexamples": 2 * broken}, "n": 2000}

    record = {"what": "gamma study", "machine": "a CPU", "runs": [run(0, 0.9, 0.6, 1), run(1, 0.8, 0.8, 0)]}
    row = render.gamma_summary(record, render.Page(REPO / "docs" / "x.md")).splitlines()[2]
    # means over the seeds; the converted model's numbers with the half-width of their 95% t-interval (2 seeds:
    # t = 12.706, sd 7.07 points -> 63.5)
    assert row == ("| demo | defaults | demo | 2 | 2,000 | 0.70 | 85.0 ± 63.5 (90.0) | 65.0 ± 63.5 (65.0) "
                   "| 45.0 ± 63.5 (45.0) | "
                   "65.0 ± 63.5 / 65.0 | 45.0 ± 63.5 / 45.0 | 1/200 | 2/200 |")
    assert "(gamma study)" in render.provenance(record, render.Page(REPO / "docs" / "x.md"), "gamma_study")
    # a record gathered over many commits names the code of each group of rows in a list after the sentence
    listed = render.provenance({**record, "code": ["Rows 'defaults': commit a.", "Rows 'x': commit b."]},
                               render.Page(REPO / "docs" / "x.md"), "gamma_study")
    assert "code: per group of rows, below;" in listed
    assert listed.endswith("](records/gamma_study.json).\n\n- Rows 'defaults': commit a.\n- Rows 'x': commit b.")

    # runs certified on half of the evaluation split (calibration compared: --check-data) are tabled apart
    record["runs"].append({**run(0, 0.7, 0.5, 3), "tag": "check data", "evaluated_on": "rest half"})
    page = render.Page(REPO / "docs" / "x.md")
    assert [line.split(" | ")[1] for line in render.gamma_summary(record, page).splitlines()[2:]] == ["defaults"]
    assert [line.split(" | ")[1] for line in render.gamma_check_data(record, page).splitlines()[2:]] == ["check data"]
    # flips inside the calibrated radius per set of images: summed over seeds; the shortest flip: mean over seeds
    found = {"held-out": {"attacked": 72, "inside_calibrated": 0, "shortest": 0.6},
             "trained": {"attacked": 200, "inside_calibrated": 0, "shortest": 0.5},
             "evaluation": {"attacked": 180, "inside_calibrated": 5, "shortest": 0.2}}
    record["runs"][0]["flip_ratios"] = {"kappa": 0.4, **found}
    record["runs"][1]["flip_ratios"] = {"kappa": 0.6, **found, "evaluation": {**found["evaluation"], "shortest": 0.4}}
    assert render.gamma_flip_ratios(record, page).splitlines()[2] == (
        "| demo | defaults | 2 | 0.50 | 0/144, 0.60 | 0/400, 0.50 | 10/360, 0.30 |")

    # per shipped recipe: its 'defaults' runs (other settings left out), and a recipe no run used says so
    record["runs"].append({**run(2, 0.6, 0.0, 0), "tag": "gamma 0.05", "recipe": "resnet"})
    record["runs"][1]["pgd_calibrated"] = {"attacked": 0, "counterexamples": 0}  # kappa 0: no radius reported
    record["runs"].append({**run(0, 0.8, 0.5, 0), "model": "vit16", "recipe": "vit"})
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in
            render.gamma_recipes(record, page).splitlines()[2:]}
    from certify_zoo.recipes import available_recipes

    assert list(rows) == [f"`{name}`" for name in available_recipes()]
    assert rows["`demo`"] == ["demo (2 seeds)", "85.0 (90.0)", "45.0 (45.0)", "0.70", "1 of 2", "1 of 100 |"]
    assert rows["`vit`"][0] == "vit16 (1 seed)"
    assert rows["`resnet`"][0] == "not measured on a model here"
