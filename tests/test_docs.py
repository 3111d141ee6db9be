"""The docs: benchmark pages match their JSON, and the README stays short, unrepeated and true."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import benchmarks.docs as docs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_every_benchmark_page_is_up_to_date() -> None:
    stale = docs.stale_pages()
    assert not stale, f"out of date: {[str(p) for p in stale]}; run `python -m benchmarks.docs`"


def test_every_results_file_has_a_page() -> None:
    _, skipped = docs.render_all()
    assert skipped == [], f"no renderer for {skipped}: add one to benchmarks/docs/ (RENDERERS)"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of benchmarks/results and freshly generated pages, in a temporary folder."""
    results, out = tmp_path / "results", tmp_path / "docs"
    shutil.copytree(docs.RESULTS, results)
    docs.write_pages(results, out)
    return results, out


def test_a_changed_figure_makes_its_page_stale_and_flips_its_verdict(tree: tuple[Path, Path]) -> None:
    results, out = tree
    page = out / "benchmarks" / "ddp_overhead.md"
    assert docs.stale_pages(results, out) == []
    data = json.loads((results / "ddp_overhead.json").read_text())
    models, target = data["models"], data["target_ratio"]
    before = models["mlp-small"]["ratio_median"]
    was_met = before <= target
    assert f"mlp-small {before:.3f} {'met' if was_met else '**MISSED**'}" in page.read_text()
    after = 1.25 * target if was_met else 0.9 * target  # the other side of the target
    models["mlp-small"]["ratio_median"] = after
    (results / "ddp_overhead.json").write_text(json.dumps(data))

    assert docs.stale_pages(results, out) == [page, out / "README.md"]  # the index's summary too
    changed, _ = docs.write_pages(results, out)
    text = page.read_text()
    assert changed == [page, out / "README.md"]
    assert f"mlp-small {after:.3f} {'**MISSED**' if was_met else 'met'}" in text and f"{before:.3f}" not in text
    assert "Commentary not yet reread" in text  # the prose was written for other results
    met = sum(m["ratio_median"] <= target for m in models.values())
    assert f"met on {met} of {len(models)}" in (out / "README.md").read_text()


def test_check_mode_exits_1_listing_the_stale_pages(
    tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    results, out = tree
    monkeypatch.setattr(docs, "RESULTS", results)
    monkeypatch.setattr(docs, "DOCS", out)
    assert docs.main(["--check"]) == 0
    (out / "benchmarks" / "probe.md").write_text("edited by hand\n")
    assert docs.main(["--check"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"stale: {out / 'benchmarks' / 'probe.md'}"
    assert (out / "benchmarks" / "probe.md").read_text() == "edited by hand\n"  # --check writes nothing


def test_results_without_a_renderer_are_skipped_with_a_note(tree: tuple[Path, Path]) -> None:
    results, out = tree
    (results / "no_renderer_yet.json").write_text('{"ratio": 1.0}')
    pages, skipped = docs.render_all(results, out)
    assert skipped == ["no_renderer_yet"]
    assert out / "benchmarks" / "no_renderer_yet.md" not in pages
    assert "- `benchmarks/results/no_renderer_yet.json`" in pages[out / "README.md"]


def test_a_page_whose_results_are_gone_is_stale_and_deleted(tree: tuple[Path, Path]) -> None:
    results, out = tree
    (results / "tune.json").unlink()
    hand_written = out / "benchmarks" / "notes.md"
    hand_written.write_text("# notes kept by hand\n")
    assert docs.stale_pages(results, out) == [out / "README.md", out / "benchmarks" / "tune.md"]
    docs.write_pages(results, out)
    assert not (out / "benchmarks" / "tune.md").exists() and hand_written.exists()


# -- page sources --------------------------------------------------------------------------------
@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """A copy of benchmarks/docs/pages, to edit without touching the repository."""
    out = tmp_path / "pages"
    shutil.copytree(docs.SOURCES, out)
    return out


def _edit(path: Path, old: str, new: str) -> None:
    """Replace the one occurrence of ``old`` in the file."""
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} should occur once in {path.name}"
    path.write_text(text.replace(old, new))


def _line_of(path: Path, needle: str) -> int:
    """The 1-based number of the file's first line containing ``needle``."""
    return next(i for i, line in enumerate(path.read_text().split("\n"), 1) if needle in line)


def test_every_page_source_has_a_renderer_and_every_renderer_a_source() -> None:
    """A page source without values() (or values() without prose) is a half-added page."""
    assert sorted(p.stem for p in docs.SOURCES.glob("*.md")) == sorted(docs.RENDERERS)


def test_an_unknown_placeholder_fails_naming_the_page_and_the_line(
    tree: tuple[Path, Path], sources: Path
) -> None:
    """A placeholder naming no computed value stops the rendering at its file and line."""
    results, out = tree
    page = sources / "probe.md"
    _edit(page, "## Against the targets\n", "## Against the targets\n\nSee {{ no_such_value | .2f }}.\n")
    line = _line_of(page, "no_such_value")
    with pytest.raises(docs.TemplateError, match=rf"probe\.md line {line}: unknown placeholder "
                                                   r"\{\{ no_such_value \| \.2f \}\}.*no 'no_such_value'"):
        docs.render_all(results, out, sources)


def test_a_value_no_placeholder_uses_fails_naming_it(tree: tuple[Path, Path], sources: Path) -> None:
    """A value computed but cited nowhere is an error: a figure dropped from the prose by mistake."""
    results, out = tree
    _edit(sources / "adam_noise.md", "{{ table }}\n", "")
    with pytest.raises(docs.TemplateError, match=r"adam_noise\.md: values computed but never used: table"):
        docs.render_all(results, out, sources)


def test_a_page_source_edit_changes_only_that_page(tree: tuple[Path, Path], sources: Path) -> None:
    """Prose is edited in the Markdown source; the page follows and no figure moves."""
    results, out = tree
    page = out / "benchmarks" / "adam_noise.md"
    before = page.read_text()
    assert docs.stale_pages(results, out, sources) == []
    _edit(sources / "adam_noise.md", "This compares the two estimates", "This page compares, plainly, the two estimates")
    assert docs.stale_pages(results, out, sources) == [page]  # the index keeps its line
    assert docs.write_pages(results, out, sources)[0] == [page]
    after = page.read_text()
    assert "This page compares, plainly, the two estimates" in after and after != before
    assert after.replace("This page compares, plainly,", "This compares") == before  # figures unchanged


def test_the_written_for_front_matter_round_trips(
    tree: tuple[Path, Path], sources: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stale ``written_for`` line brings the banner; the digest ``--digests`` prints removes it."""
    results, out = tree
    source = sources / "gns_overhead.md"
    current = docs.digest(json.loads((results / "gns_overhead.json").read_text()))
    assert docs.read_source(source).written_for == current  # the commentary was reread for these results
    page = out / "benchmarks" / "gns_overhead.md"
    reread = page.read_text()

    _edit(source, f"written_for: {current}", "written_for: 000000000000")  # the results moved on
    docs.write_pages(results, out, sources)
    banner = page.read_text()
    assert "Commentary not yet reread" in banner and "`000000000000`" in banner
    assert f"set `written_for` in `{source}` to `{current}`" in banner

    monkeypatch.setattr(docs, "RESULTS", results)
    assert docs.main(["--digests"]) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.splitlines())
    _edit(source, "written_for: 000000000000", f"written_for: {printed['gns_overhead']}")  # reread: one line
    docs.write_pages(results, out, sources)
    assert page.read_text() == reread


@pytest.mark.parametrize(("template", "values", "expected"), [
    ("{{ n | , }} runs, {{ r | .2f }}x, {{ p | +.1% }}", {"n": 1402, "r": 1.0909, "p": 0.045}, "1,402 runs, 1.09x, +4.5%"),
    ("{{ lr | sig }} / {{ lr | e2 }} / {{ lr | e3 }}", {"lr": 0.0013924}, "1.39e-3 / 1.4e-3 / 1.39e-3"),
    ("B in {{{ sizes }}}", {"sizes": "16, 32"}, "B in {16, 32}"),
    ("{{ arms.fixed-16.steps }} and {{ runs.1 }}", {"arms": {"fixed-16": {"steps": 7}}, "runs": [3, 4]}, "7 and 4"),
    ("{{ arm.default.mean | .4f }}", {"arm": docs.PENDING}, "-"),
])
def test_placeholders_fill_as_documented(template: str, values: dict, expected: str) -> None:
    """Format specs, named filters, literal braces, dotted names, pending values."""
    assert docs.fill(template, values, Path("page.md")) == expected


@pytest.mark.parametrize(("template", "values", "message"), [
    ("a {{ x } b", {"x": 1}, r"page\.md line 3: an unmatched"),
    ("{{ x | .2f }}", {"x": "text"}, r"line 3: \{\{ x \| \.2f \}\}: format '\.2f' does not apply to 'text'"),
    ("{{ x }}", {"x": None}, r"line 3: \{\{ x \}\} has the value None"),
    ("{{ a.b.c }}", {"a": {"b": {"d": 1}}}, r"no 'a\.b\.c' \(known there: d\)"),
    ("{{ 2x }}", {}, r"is not a placeholder"),
])
def test_a_bad_placeholder_fails_with_the_rule_and_the_fix(template: str, values: dict, message: str) -> None:
    """Each malformed placeholder fails with the line and what was wrong."""
    with pytest.raises(docs.TemplateError, match=message):
        docs.fill(template, values, Path("page.md"), first_line=3)


def test_a_page_source_without_front_matter_fails(tmp_path: Path) -> None:
    """The front matter (written_for, summary) is required."""
    page = tmp_path / "bare.md"
    page.write_text("# Title\n\nProse.\n")
    with pytest.raises(docs.TemplateError, match=r"bare\.md line 1: a page source starts with a front matter"):
        docs.read_source(page)


# -- README ------------------------------------------------------------------------------------
def _paragraphs(text: str) -> list[str]:
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]


def test_readme_is_short_and_repeats_no_paragraph() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    seen: dict[str, int] = {}
    for paragraph in _paragraphs(text):
        seen[paragraph] = seen.get(paragraph, 0) + 1
    repeated = [p[:80] for p, n in seen.items() if n > 1 and len(p) > 3]
    assert repeated == []


def test_paragraph_splitting_finds_a_repeat() -> None:
    # The check above is only as good as its splitting: a paragraph re-wrapped differently
    # must still count as the same paragraph.
    paragraphs = _paragraphs("A b c.\nD e.\n\nx\n\nA b\nc. D e.\n")
    assert paragraphs == ["A b c. D e.", "x", "A b c. D e."]


def test_readme_has_the_test_command_ci_runs() -> None:
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    assert command in README.read_text()
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_every_autobatch_name_in_the_readme_exists_at_its_new_home() -> None:
    names = sorted(set(re.findall(r"\bautobatch(?:\.[A-Za-z_]\w*)+", README.read_text())))
    assert "autobatch.fit" in names
    missing = []
    for name in names:
        parts = name.split(".")
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # an old top-level name fails
            for i in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                try:
                    for attr in parts[i:]:
                        obj = getattr(obj, attr)
                except (AttributeError, DeprecationWarning):
                    missing.append(name)
                break
    assert missing == []


# -- the README's main job: its printed block is what the command prints --------------------------
# How the block was produced (the README says so): torch 2.13.0's kernels for AVX-512, one torch
# thread (the CLI's default). Other thread counts, kernels or torch releases round differently,
# and a run of 3,000 steps then takes other steps: there the numbers are not compared.
_BLOCK_TORCH, _BLOCK_CPU = "2.13.0", "AVX512"


def _readme_main_job() -> tuple[str, list[str]]:
    """The README's first command (``autobatch fit ...``) and its printed block."""
    text = README.read_text()
    command = re.search(r"pip install -e \. && (autobatch fit [^`\n]*)", text).group(1).strip()
    block = re.search(r"```console\n(.*?)```", text, re.S).group(1)
    return command, block.strip().splitlines()


@pytest.fixture(scope="module")
def main_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str], Path]:
    """(the README's block, what the command prints, the folder it ran in): run as a user runs
    it, in a fresh folder."""
    command, block = _readme_main_job()
    folder = tmp_path_factory.mktemp("main_job")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # this checkout
    run = subprocess.run([sys.executable, "-m", "autobatch", *command.split()[1:], "--no-progress"], cwd=folder,
                         env=env, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr
    return block, run.stdout.strip().splitlines(), folder


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split())


@pytest.mark.slow
def test_the_readme_main_job_prints_the_blocks_lines(main_job) -> None:
    block, printed, folder = main_job
    assert len(printed) == len(block) and printed[0] == block[0]  # the command it echoes
    totals, expected = _fields(printed[1]), _fields(block[1])
    assert list(totals) == list(expected) and totals["samples"] == expected["samples"] == "80000"
    assert totals["epochs"] == expected["epochs"]
    assert printed[2].startswith("final: val_loss=") and printed[3].startswith("batch size: 16 -> ")
    assert printed[4:] == block[4:]  # the plot and history paths
    assert (folder / block[4].removeprefix("plot: ")).stat().st_size > 10_000


@pytest.mark.slow
def test_the_readme_main_jobs_numbers_are_the_commands(main_job) -> None:
    cpu = torch.backends.cpu.get_cpu_capability()
    if torch.__version__.split("+")[0] != _BLOCK_TORCH or cpu != _BLOCK_CPU:
        pytest.skip(f"the README's numbers come from torch {_BLOCK_TORCH} on {_BLOCK_CPU}; this is torch "
                    f"{torch.__version__} on {cpu}, which rounds differently")
    block, printed, _ = main_job
    # every total but the wall time, the final metrics at their printed precision, the B line
    totals, expected = _fields(printed[1]), _fields(block[1])
    assert {k: v for k, v in totals.items() if k != "wall_time"} == {k: v for k, v in expected.items() if k != "wall_time"}
    assert printed[2] == block[2]
    assert printed[3] == block[3]
