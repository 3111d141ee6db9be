"""The docs: benchmark pages match their JSON, and the README stays short, unrepeated and true."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest

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
