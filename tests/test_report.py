"""report.html: every section for a folder run, an IDX run and a CSV run; user names shown as text;
self-contained (every picture a data: URI, nothing fetched); and opened for real in headless Chromium:
every image loads, no console error, a screenshot is taken."""

from __future__ import annotations

import csv
import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, ROOT, cli_env, run_cli

SECTIONS = ["summary", "curves", "confusion", "per-class", "confused-pairs", "highest-loss", "label-review",
            "duplicates", "reliability", "events"]
HOSTILE = ['a<b>', 'x&amp;"q\'']  # a tag, an entity and quotes in class folder names
NOT_UTF8 = os.fsdecode(b"s\xff")  # a folder name that is not UTF-8 (kept as os.fsdecode text, shown escaped)


def assert_self_contained_with_every_section(page: str) -> None:
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs), [s[:40] for s in srcs if not s.startswith("data:")]
    for outside in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert outside not in page, outside


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FAST run on class folders whose names hold HTML characters, one file name not UTF-8."""
    from PIL import Image

    from cnn_finetune.data.loader import load_dataset

    work = tmp_path_factory.mktemp("folder_run")
    ds = load_dataset(None, use_cache=False)
    for c, name in enumerate(HOSTILE + [NOT_UTF8]):
        folder = work / "data" / name
        folder.mkdir(parents=True)
        for k, i in enumerate(torch.nonzero(ds.labels == c).flatten()[:30].tolist()):
            # In the class that is not UTF-8, the file names are not either.
            Image.fromarray(ds.images[i, 0].numpy()).save(folder / (f"img{k:02d}.png" if c < 2 else os.fsdecode(b"caf\xe9%02d.png" % k)))
    # One picture filed twice: the first image of the first class also in the second (the report shows it).
    shutil.copyfile(work / "data" / HOSTILE[0] / "img00.png", work / "data" / HOSTILE[1] / "copy.png")
    # set_aside on: half-way (epoch 3) the lowest-margin 5% stop counting in the loss; the page marks them.
    proc = run_cli([*FAST, "--data", "data", "--set", "set_aside=on", "--output-dir", "out"], cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "out"


def test_a_folder_run_report_shows_user_names_as_text(folder_run: Path):
    page = (folder_run / "report.html").read_text(encoding="utf-8")
    assert_self_contained_with_every_section(page)
    assert "<b>" not in page and "a&lt;b&gt;" in page  # the folder name is text, not a tag
    assert "x&amp;amp;" in page and 'x&amp;"q' not in page  # the entity is shown as typed, the quote escaped
    assert 'x&amp;"q\'' in html.unescape(page)
    assert "s\\xff" in page and "\ufffd" not in page  # the undecodable byte is shown escaped, not replaced
    rows = list(csv.DictReader(open(folder_run / "label_review.csv", encoding="utf-8", newline="")))
    assert len(rows) == 82 and {r["given_label"] for r in rows} == {*HOSTILE, "s\\xff"}  # 91 images, 9 for validation
    # The picture filed under two labels is shown once, with both files and labels, names as text.
    section = page.split('<section id="duplicates">', 1)[1].split("</section>", 1)[0]
    assert "2 images are 1 picture(s)" in section and section.count('<img class="thumb"') == 1
    assert "data/a&lt;b&gt;/img00.png</span> (a&lt;b&gt;)" in section and "/copy.png</span> (x&amp;amp;&#34;q&#39;)" in section
    for r in rows:  # each row names its real file (escaped where not UTF-8) in its class folder
        if r["given_label"] == "s\\xff":
            assert re.fullmatch(r"data/s\\xff/caf\\xe9\d\d\.png", r["image"]), r["image"]
        else:
            assert Path(folder_run.parent / r["image"]).is_file() and Path(r["image"]).parent.name == r["given_label"]


def test_an_idx_run_and_a_csv_run_have_every_section(reference_run: Path, tiny_idx: Path, tmp_path: Path):
    assert_self_contained_with_every_section((reference_run / "report.html").read_text(encoding="utf-8"))
    from cnn_finetune.data.loader import load_dataset

    ds = load_dataset(tiny_idx, use_cache=False)
    with open(tmp_path / "pixels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label"] + [f"pixel{i}" for i in range(784)])
        for img, label in zip(ds.images[:200], ds.labels[:200]):
            w.writerow([ds.class_names[int(label)], *img.flatten().tolist()])
    proc = run_cli([*FAST, "--epochs", "2", "--data", "pixels.csv", "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_self_contained_with_every_section((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))
    rows = list(csv.DictReader(open(tmp_path / "out" / "label_review.csv", encoding="utf-8", newline="")))
    lines = sorted(int(r["image"].rsplit(":", 1)[1]) for r in rows)
    assert all(r["image"].startswith("pixels.csv:") for r in rows)  # as given on the command line
    assert len(rows) == 180 and 2 <= lines[0] and lines[-1] <= 201  # CSV lines of images (line 1: the header)


def test_evaluate_writes_a_report_with_the_runs_curves_and_review(reference_run: Path, tiny_idx: Path, tmp_path: Path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(reference_run / "best_model_finetuned.pth"),
                           "--data", str(tiny_idx), "--output-dir", "ev"], cwd=tmp_path, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "ev" / "report.html").read_text(encoding="utf-8")
    assert_self_contained_with_every_section(page)
    assert "No training curves" not in page and "No label review" not in page
    assert (tmp_path / "ev" / "reliability_diagram.png").is_file()


PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src || "").slice(0, 60))), true);
window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.setAttribute("data-probe", JSON.stringify({images: imgs.length,
      broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length, errors: window.__errors}));
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium() is None, reason="headless Chromium not found (Debian: apt-get install chromium; .ci/run installs it)")
def test_the_report_opens_in_a_real_browser(folder_run: Path, tmp_path: Path):
    import json

    page = (folder_run / "report.html").read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"  # the report with a probe that writes what the page saw into the DOM
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert found, dom.stderr[-2000:]
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["images"] >= 10 and probe["broken"] == 0 and probe["errors"] == [], probe
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    # The images the run set aside are marked on their cards, as in label_review.csv; the note says how many.
    rows = list(csv.DictReader(open(folder_run / "label_review.csv", encoding="utf-8", newline="")))
    aside = [r for r in rows if r["set_aside"] == "yes"]
    from cnn_finetune.tools.report import REVIEW

    shown = [r for r in rows[:REVIEW] if r["set_aside"] == "yes"]
    assert aside and shown and dom.stdout.count('<span class="aside">set aside</span>') == 1 + len(shown)
    assert f"half-way through the run ({len(aside)} in all; set_aside)" in html.unescape(dom.stdout)
    shot = tmp_path / "report.png"
    proc = subprocess.run([*flags, "--window-size=1200,4000", f"--screenshot={shot}", (folder_run / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 4000)
        assert len(set(np.asarray(im.convert("L").resize((120, 400))).flatten().tolist())) > 20  # not a blank page
    if os.environ.get("REPORT_SCREENSHOT"):  # keep it for a person to look at
        shutil.copy(shot, os.environ["REPORT_SCREENSHOT"])
