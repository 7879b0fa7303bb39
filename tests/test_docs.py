"""The documents against the code: the README opens with the two commands a fresh machine needs,
every flag and every dotted name the documents give exists, the links resolve, the submission
forms the README describes are the ones classification_evaluation.py writes, and no document
speaks of issue numbers."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import classification_evaluation

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted(p for p in REPO.glob("*/README.md") if not p.parent.name.startswith("."))]
SCRIPTS = ["pcnn_train.py", "classification_evaluation.py", "generation_evaluation.py", "bench.py",
           "dataset.py", "docs/hybrid_frontier.py"]
OTHER_TOOLS_FLAGS = {"--nproc_per_node"}   # torchrun's
CODE_MODULES = ["model", "layers", "utils", "dataset", "pcnn_train", "classification_evaluation",
                "generation_evaluation", "bench"]


def readme():
    return (REPO / "README.md").read_text()


def test_readme_opens_with_the_main_job_and_the_tests():
    """Before the first section: one line that installs and trains, one that installs and tests,
    each naming files that exist."""
    opening = readme().split("\n## ")[0]
    commands = [line.strip() for line in opening.splitlines() if line.startswith("    ")]
    assert commands == ["pip install -r requirements.txt && python pcnn_train.py --preset cpu",
                        "pip install -r requirements-test.txt && python -m pytest -q tests"]
    assert (REPO / "requirements.txt").is_file() and (REPO / "requirements-test.txt").is_file()
    assert (REPO / "pcnn_train.py").is_file() and (REPO / "tests").is_dir()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_document_refers_to_issue_numbers(doc):
    text = doc.read_text()
    assert not re.search(r"\bissues?\b|#\d", text, re.I), doc


def test_every_flag_the_documents_give_exists():
    """Each --flag in the documents is in some script's --help."""
    helps = "".join(subprocess.run([sys.executable, script, "--help"], cwd=REPO, check=True,
                                   capture_output=True, text=True, timeout=120).stdout
                    for script in SCRIPTS)
    known = set(re.findall(r"--[a-z][a-z0-9_]*", helps)) | OTHER_TOOLS_FLAGS
    for doc in DOCS:
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", doc.read_text()))
        assert flags <= known, (doc.name, sorted(flags - known))


def test_every_dotted_name_the_documents_give_exists():
    """`module.name` and `PixelCNN.method` in backticks name something the code has. `model.x`
    may also be a method of a model (`model.load_state_dict(...)`); `dataset.py` is a file."""
    owners = {name: [importlib.import_module(name)] for name in CODE_MODULES}
    PixelCNN = owners["model"][0].PixelCNN
    owners["model"].append(PixelCNN)
    owners["PixelCNN"] = [PixelCNN]
    for doc in DOCS:
        for owner, attr in re.findall(r"`(\w+)\.(\w+)(?:\(|`)", doc.read_text()):
            if owner in owners and not (REPO / f"{owner}.{attr}").exists():
                assert any(hasattr(o, attr) for o in owners[owner]), (doc.name, f"{owner}.{attr}")


def test_sampler_names_in_the_documents_exist():
    """Bare names of the cached sampler's pieces: the model module has each one named."""
    import model
    for doc in DOCS:
        for name in set(re.findall(r"`(forward_\w+|\w+Cache)`", doc.read_text())):
            assert hasattr(model, name) or hasattr(model.PixelCNN, name), (doc.name, name)


def test_relative_links_resolve():
    """Links to files and to their sections (#anchor as GitHub makes it from a heading)."""
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:]*)(#[^)]*)?\)", doc.read_text()):
            path, anchor = target
            linked = (doc.parent / path) if path else doc
            assert linked.is_file(), (doc.name, path)
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                         for h in headings}
                assert anchor[1:] in slugs, (doc.name, path, anchor)


def test_readme_says_which_submission_form_is_which():
    """Each --submission_format the script has, with its header and a row of each form."""
    text = readme()
    for form in classification_evaluation.SUBMISSION_FORMATS:
        assert f"`{form}`" in text
    assert re.search(r"\| `id_label` \(default\) \| `id,label` \| `0000021\.jpg,2` \| `fid,<value>`",
                     text)
    assert re.search(r"\| `test_csv` \| none \| `test/0000021\.jpg,2`", text)


def test_hybrid_frontier_plots_the_checkpoint_each_run_kept(tmp_path):
    """docs/hybrid_frontier.py takes the last record marked kept, or in older logs the first with
    the best accuracy (training kept a new best only when strictly better), prints the run's table
    row with images/s over its whole training time and the fitted prior's accuracy where its
    class_prior.json lies beside the log, and writes one PNG for the committed logs."""
    sys.path.insert(0, str(REPO / "docs"))
    try:
        from hybrid_frontier import kept_checkpoint, table_row
    finally:
        sys.path.remove(str(REPO / "docs"))
    log = tmp_path / "run_log.jsonl"
    rows = [(0.5, 6.0, 10, 2.0), (0.7, 5.5, 30, 4.0), (0.6, 5.0, 30, 4.0), (0.7, 4.9, 30, 4.0)]
    log.write_text("".join(json.dumps(dict(epoch=e + 1, val_acc=a, val_bpd=b, train_seconds=t,
                                           images_per_s=ips)) + "\n"
                           for e, (a, b, t, ips) in enumerate(rows)))
    assert kept_checkpoint(log)["val_bpd"] == 5.5
    # 380 images in 100 s of training: 3.8 images/s, not the mean of the records' rates.
    assert table_row(log, "run") == "| `run` | 3.8 | 4.0 | 70.00% (2.0) | 5.500 | 4.900 | - |"
    # --keep last marks every record kept; --keep best the new bests
    for marks, bpd in (([True] * 4, 4.9), ([True, True, False, False], 5.5)):
        log.write_text("".join(json.dumps(dict(epoch=e + 1, val_acc=a, val_bpd=b, train_seconds=t,
                                               images_per_s=ips, kept=k)) + "\n"
                               for e, ((a, b, t, ips), k) in enumerate(zip(rows, marks))))
        assert kept_checkpoint(log)["val_bpd"] == bpd
    (tmp_path / "run_class_prior.json").write_text(json.dumps(dict(val_acc=0.8123)))
    assert table_row(log, "run").endswith("| 5.500 | 4.900 | 81.23% |")

    logs = sorted(str(p) for p in (REPO / "results").rglob("*_log.jsonl"))
    out = tmp_path / "frontier.png"
    proc = subprocess.run([sys.executable, "docs/hybrid_frontier.py", *logs, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"{len(logs)} runs" in proc.stdout
