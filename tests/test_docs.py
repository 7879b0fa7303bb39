"""The documents against the code and the results: the README opens with the two commands a fresh
machine needs and stays a guide's length; its presets are the code's; every flag, dotted name,
link, path and commit the documents give exists; every file in results/ is indexed by a document;
the submission forms the README describes are the ones classification_evaluation.py writes; and
no document speaks of issue numbers or sessions."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import classification_evaluation

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted(p for p in REPO.glob("*/README.md") if not p.parent.name.startswith(".")),
        *sorted(RESULTS.glob("*/README.md"))]
SCRIPTS = ["pcnn_train.py", "classification_evaluation.py", "generation_evaluation.py", "bench.py",
           "dataset.py", "docs/run_table.py", "gpu_sweep.py"]
OTHER_TOOLS_FLAGS = {"--nproc_per_node"}   # torchrun's
# Flags of the hybrid objective, retired at commit 98f7474. The experiment record may name them in
# the commands that ran at older commits; the README presents none of them.
RETIRED_FLAGS = {"--disc_weight", "--disc_fraction", "--disc_rows", "--disc_params", "--prior_lr"}
RETIRED_PATHS = {"docs/hybrid_frontier.py"}   # named where the record says where it went
# What a command writes rather than what the repository holds.
WRITTEN_BY_COMMANDS = ("results/gpu/", "results/gpu.tar.gz")   # bash gpu_check.sh
CODE_MODULES = ["model", "layers", "utils", "dataset", "training", "cli", "pcnn_train",
                "classification_evaluation", "generation_evaluation", "bench", "gpu_sweep"]
README_MAX_LINES, README_MAX_CHARS = 250, 15_000


def readme():
    return (REPO / "README.md").read_text()


def doc_id(doc):
    return str(doc.relative_to(REPO))


def test_readme_opens_with_the_main_job_and_the_tests():
    """Before the first section: one line that installs and trains, one that installs and tests,
    each naming files that exist."""
    opening = readme().split("\n## ")[0]
    commands = [line.strip() for line in opening.splitlines() if line.startswith("    ")]
    assert commands == ["pip install -r requirements.txt && python pcnn_train.py --preset cpu",
                        "pip install -r requirements-test.txt && python -m pytest -q tests"]
    assert (REPO / "requirements.txt").is_file() and (REPO / "requirements-test.txt").is_file()
    assert (REPO / "pcnn_train.py").is_file() and (REPO / "tests").is_dir()


def test_readme_is_a_guide_not_a_record():
    text = readme()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert len(text) <= README_MAX_CHARS


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_no_document_refers_to_issue_numbers_or_sessions(doc):
    text = doc.read_text()
    assert not re.search(r"\bissues?\b|#\d|\bsessions?\b", text, re.I), doc


def test_every_flag_the_documents_give_exists():
    """Each --flag in the documents is in some script's --help; the retired hybrid objective's
    flags only in the record of the runs made with them, never in the README."""
    helps = "".join(subprocess.run([sys.executable, script, "--help"], cwd=REPO, check=True,
                                   capture_output=True, text=True, timeout=120).stdout
                    for script in SCRIPTS)
    known = set(re.findall(r"--[a-z][a-z0-9_]*", helps)) | OTHER_TOOLS_FLAGS
    for doc in DOCS:
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", doc.read_text()))
        allowed = known if doc.name == "README.md" and doc.parent == REPO else known | RETIRED_FLAGS
        assert flags <= allowed, (doc_id(doc), sorted(flags - allowed))
    assert not RETIRED_FLAGS & set(re.findall(r"--[a-z][a-z0-9_]*", readme()))


def _flags(block):
    """{"--flag": "value"} of a block of `--flag value` pairs."""
    return dict(re.findall(r"(--[a-z][a-z0-9_]*) (\S+)", block))


def _same(value, text):
    if isinstance(value, bool):
        return text == str(value).lower()
    if isinstance(value, (int, float)):
        return float(text) == value
    return text == value


def test_readme_presets_are_the_code_presets():
    """Each preset's block in the README gives exactly its values in training.PRESETS."""
    from training import PRESETS
    text = readme()
    section = text.split("\n## Presets\n")[1].split("\n## ")[0]
    blocks = dict(re.findall(r"\*\*`--preset (\w+)`\*\*.*?\n\n((?:    [^\n]*\n)+)", section,
                             re.S))
    assert set(blocks) == set(PRESETS)
    for name, values in PRESETS.items():
        given = _flags(blocks[name])
        assert set(given) == {f"--{key}" for key in values}, name
        for key, value in values.items():
            assert _same(value, given[f"--{key}"]), (name, key, value, given[f"--{key}"])


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
                assert any(hasattr(o, attr) for o in owners[owner]), (doc_id(doc), f"{owner}.{attr}")


def test_sampler_names_in_the_documents_exist():
    """Bare names of the cached sampler's pieces: the model module has each one named."""
    import model
    for doc in DOCS:
        for name in set(re.findall(r"`(forward_\w+|\w+Cache)`", doc.read_text())):
            assert hasattr(model, name) or hasattr(model.PixelCNN, name), (doc_id(doc), name)


def test_relative_links_resolve():
    """Links to files and to their sections (#anchor as GitHub makes it from a heading)."""
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:]*)(#[^)]*)?\)", doc.read_text()):
            path, anchor = target
            linked = (doc.parent / path) if path else doc
            assert linked.is_file(), (doc_id(doc), path)
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                         for h in headings}
                assert anchor[1:] in slugs, (doc_id(doc), path, anchor)


def _named_paths(text):
    """Repository paths a text names: results/..., docs/..., tests/..., models/... anywhere, and
    `name.py` in backticks."""
    paths = {p.rstrip(".") for p in re.findall(r"(?<![\w./<-])((?:results|docs|tests|models)/[\w./*-]*)",
                                                 text)}
    return paths | set(re.findall(r"`([\w/-]+\.py)`", text))


def test_every_path_a_document_names_exists():
    """Every repository path a document names exists (a glob matches something), a script named
    alone lies at the top, in tests/ or in docs/, and every file a results README names in
    backticks lies beside it or at the relative path given."""
    for doc in DOCS:
        text = doc.read_text()
        for path in _named_paths(text):
            if path in RETIRED_PATHS or path.startswith(WRITTEN_BY_COMMANDS) or \
                    re.search(r"[A-Z]", path):
                continue                                   # NAME, PATH: placeholders
            if "*" in path:
                assert list(REPO.glob(path)), (doc_id(doc), path)
            elif "/" in path:
                assert (REPO / path).exists(), (doc_id(doc), path)
            else:
                assert any((REPO / d / path).is_file() for d in (".", "tests", "docs")), \
                    (doc_id(doc), path)
        if doc.parent.parent == RESULTS:
            for name in re.findall(r"`([\w./-]+\.(?:jsonl|json|png))`", text):
                assert (doc.parent / name).is_file(), (doc_id(doc), name)


def test_every_results_file_is_indexed():
    """Each folder of results/ has a README that the index links; each file there is named by its
    folder's README or, by its path, by some document; the index says where the pruned files
    are."""
    index = (RESULTS / "README.md").read_text()
    assert "98f7474" in index
    texts = {doc: doc.read_text() for doc in DOCS}
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        if f"results/{folder.name}/" in WRITTEN_BY_COMMANDS:
            continue
        assert (folder / "README.md").is_file(), folder.name
        assert f"]({folder.name}/README.md)" in index, folder.name
        for file in sorted(folder.rglob("*")):
            if file.is_dir() or file.name == "README.md":
                continue
            relative = str(file.relative_to(REPO))
            assert (f"`{file.name}`" in texts[folder / "README.md"]
                    or any(relative in text for text in texts.values())), relative
    loose = [p.name for p in RESULTS.iterdir() if p.is_file() and p.name != "README.md"]
    assert not loose, loose


def test_readme_results_table_gives_a_command_and_a_commit_per_row():
    """One results table; each row gives the command and the commit that made it, or says it is
    not measured yet and gives the command that will measure it."""
    section = readme().split("\n## Results\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 4, rows
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert re.fullmatch(r"`(python|git|bash) .+`", cells[1]), row
        assert re.fullmatch(r"[0-9a-f]{7,40}", cells[2]) or "`bash gpu_check.sh`" in row, row


def test_every_commit_the_documents_name_exists():
    """Seven-character commit hashes in the documents name commits of this repository's history
    (skipped outside a git checkout)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    named = set()
    for doc in DOCS:
        named |= {h for h in re.findall(r"(?<![\w.])[0-9a-f]{7}(?![\w])", doc.read_text())
                  if re.search(r"[a-f]", h) and re.search(r"\d", h)}
    check = subprocess.run(["git", "cat-file", "--batch-check"], cwd=REPO, capture_output=True,
                           text=True, input="".join(f"{h}^{{commit}}\n" for h in sorted(named)))
    assert check.returncode == 0 and "missing" not in check.stdout, check.stdout


def test_run_table_reads_the_checkpoint_each_run_kept(tmp_path):
    """docs/run_table.py takes the last record marked kept, or in older logs the first with the
    best accuracy (training kept a new best only when strictly better), prints the run's row with
    images/s over its whole training time and the fitted prior's accuracy where its
    class_prior.json lies beside the log, a row per committed log, and a PNG with --out."""
    sys.path.insert(0, str(REPO / "docs"))
    try:
        from run_table import kept_checkpoint, table_row
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

    logs = sorted(str(p.relative_to(REPO)) for p in RESULTS.rglob("*_log.jsonl"))
    out = tmp_path / "runs.png"
    proc = subprocess.run([sys.executable, "docs/run_table.py", *logs, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sum(line.startswith("| `") for line in proc.stdout.splitlines()) == len(logs)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"{len(logs)} runs" in proc.stdout


def test_readme_says_which_submission_form_is_which():
    """Each --submission_format the script has, with its header and a row of each form."""
    text = readme()
    for form in classification_evaluation.SUBMISSION_FORMATS:
        assert f"`{form}`" in text
    assert re.search(r"\| `id_label` \(default\) \| `id,label` \| `0000021\.jpg,2` \| `fid,<value>`",
                     text)
    assert re.search(r"\| `test_csv` \| none \| `test/0000021\.jpg,2`", text)
