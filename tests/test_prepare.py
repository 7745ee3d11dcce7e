"""The `medvlp prepare` pipeline: generic folder importer, quarantine, resume, privacy, CLI."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlp.cli import main
from medvlp.data import sample
from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.prepare import PREPARERS, base, pipeline, prepare
from medvlp.data.prepare.folder import FolderPreparer
from medvlp.errors import ConfigError, DataError
from tests.prepare_helpers import write_dicom

pydicom = pytest.importorskip("pydicom")


def _png(path: Path, shape=(40, 60), dtype=np.uint8, seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    top = np.iinfo(dtype).max
    arr = np.random.default_rng(seed).integers(0, top, shape, endpoint=True).astype(dtype)
    Image.fromarray(arr).save(path)


def _folder(root: Path, n_good: int = 6) -> Path:
    """A user folder: good 8-bit PNG / JPG / 16-bit PNG rows plus one of each bad kind."""
    lines = ["path,report,subject_id,Cardiomegaly,pleural effusion,site,PatientName"]
    (root / "img").mkdir(parents=True)
    for i in range(n_good):
        name = f"img/{i}.png" if i % 3 else f"img/{i}.jpg"
        if i % 3 == 2:
            _png(root / name, dtype=np.uint16, seed=i)
        elif name.endswith(".jpg"):
            Image.fromarray(np.full((50, 30, 3), 90 + i, np.uint8)).save(root / name)
        else:
            _png(root / name, seed=i)
        lines.append(f'{name},"FINDINGS: Heart is enlarged.\nIMPRESSION: Cardiomegaly {i}.",subj{i // 2},1,0,s{i},Doe^Jane')
    _png(root / "img/trunc.png")
    (root / "img/trunc.png").write_bytes((root / "img/trunc.png").read_bytes()[:60])
    _png(root / "img/empty.png")
    _png(root / "img/badlabel.png")
    lines += ['img/missing.png,"FINDINGS: clear.",subjx,0,0,a,Doe^Jane',
              'img/trunc.png,"FINDINGS: clear.",subjy,0,0,a,Doe^Jane',
              'img/empty.png,"FINDINGS: ___",subjz,0,0,a,Doe^Jane',
              'img/badlabel.png,"FINDINGS: clear.",subjw,2,0,a,Doe^Jane']
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_label_codes_match_sample():
    assert (base.POSITIVE, base.NEGATIVE, base.UNCERTAIN, base.MISSING) == (
        sample.POSITIVE, sample.NEGATIVE, sample.UNCERTAIN, sample.MISSING)
    assert [base.parse_label(v) for v in ("1.0", "0", "-1", "", "uncertain", "2")] == [1, 0, -1, -2, -1, None]


def test_folder_import_outputs_and_quarantine(tmp_path):
    root = _folder(tmp_path / "raw")
    res = prepare("folder", root, tmp_path / "out", image_size=32, shard_size=4, progress=False,
                  options={"csv": "labels.csv"})
    out = tmp_path / "out"
    assert (res.rows, res.quarantined) == (6, 4)
    assert res.quarantine_reasons == {"bad_label": 1, "empty_report": 1, "missing_file": 1, "unreadable": 1}
    quarantine = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert {q["file"]: q["reason"] for q in quarantine}["img/trunc.png"] == "unreadable"
    assert "'Cardiomegaly' has value '2'" in next(q["detail"] for q in quarantine if q["reason"] == "bad_label")
    rows = read_manifest(out)
    info = read_info(out)
    assert info["rows"] == 6 and sum(info["split_counts"].values()) == 6 and info["quarantine"]["total"] == 4
    r0 = next(r for r in rows if r.id == "img/0")
    assert r0.labels == {"Cardiomegaly": 1, "Pleural Effusion": 0}
    assert r0.findings == "Heart is enlarged." and r0.impression == "Cardiomegaly 0."
    assert r0.meta["site"] == "s0" and "PatientName" not in r0.meta
    # same subject, same split; every row's image is in its shard, resized once (longest side 32)
    assert len({r.split for r in rows if r.subject_id == "subj0"}) == 1
    index = json.loads((out / "shards" / "shards.json").read_text())
    import hashlib
    for entry in index:
        assert hashlib.sha256((out / "shards" / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    assert sum(e["rows"] for e in index) == 6
    for r in rows:
        with tarfile.open(out / "shards" / r.meta["shard"]) as tar:
            img = Image.open(io.BytesIO(tar.extractfile(f"{r.meta['key']}.png").read()))
            row = json.loads(tar.extractfile(f"{r.meta['key']}.json").read())
        assert max(img.size) == 32 and row["id"] == r.id
        h, w = r.meta["orig_size"]
        assert img.size == (round(w * 32 / max(h, w)), round(h * 32 / max(h, w)))
        src_16 = r.id in ("img/2", "img/5")
        assert (r.meta["bits"] == 16) == src_16 and (img.mode.startswith("I")) == src_16
    assert "Doe" not in (out / "manifest.jsonl").read_text()


def test_resume_after_crash_gives_identical_output(tmp_path, monkeypatch):
    root = _folder(tmp_path / "raw")
    kwargs = {"image_size": 24, "shard_size": 3, "progress": False, "options": {"csv": "labels.csv"}}
    prepare("folder", root, tmp_path / "full", **kwargs)
    real, calls = pipeline._write_chunk, []

    def crash_on_second(*args, **kw):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "_write_chunk", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare("folder", root, tmp_path / "resumed", **kwargs)
    assert not (tmp_path / "resumed" / "manifest.jsonl").exists()
    monkeypatch.setattr(pipeline, "_write_chunk", real)
    res = prepare("folder", root, tmp_path / "resumed", **kwargs)
    assert res.resumed_chunks == 1 and res.processed == 10 - 3
    assert _tree_bytes(tmp_path / "resumed") == _tree_bytes(tmp_path / "full")
    with pytest.raises(ConfigError, match="image_size differ"):
        prepare("folder", root, tmp_path / "resumed", **dict(kwargs, image_size=16))


def test_worker_pool_matches_single_process(tmp_path):
    root = _folder(tmp_path / "raw")
    kwargs = {"image_size": 24, "shard_size": 4, "progress": False, "options": {"csv": "labels.csv"}}
    prepare("folder", root, tmp_path / "one", workers=0, **kwargs)
    prepare("folder", root, tmp_path / "two", workers=2, **kwargs)
    assert _tree_bytes(tmp_path / "one") == _tree_bytes(tmp_path / "two")


def _dicom(path: Path, patient_id: str, name: str, study_uid: str, seed: int) -> None:
    arr = np.random.default_rng(seed).integers(0, 4095, (24, 20)).astype(np.uint16)
    write_dicom(path, arr, patient_id=patient_id, study_uid=study_uid, name=name, bits_stored=12)


def test_dicom_privacy_keyed_subject(tmp_path, monkeypatch, caplog, capsys):
    name, pid = "Zyxwvut^Quentin", "PID-98765-XYZ"
    raw = tmp_path / "raw"
    _dicom(raw / "a" / "one.dcm", pid, name, "1.2.3.4.100", 0)
    _dicom(raw / "b" / "two.dcm", pid, name, "1.2.3.4.200", 1)
    (raw / "b" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")  # quarantined, still private
    with pytest.raises(ConfigError, match="MEDVLP_SUBJECT_KEY"):
        prepare("folder", raw, tmp_path / "nokey", progress=False)
    monkeypatch.setenv("MEDVLP_SUBJECT_KEY", "secret-one")
    caplog.set_level("DEBUG")
    assert main(["prepare", "folder", "--root", str(raw), "--out", str(tmp_path / "k1"), "--image-size", "16",
                 "--workers", "1", "--no-progress"]) == 0
    rows = read_manifest(tmp_path / "k1")
    assert len(rows) == 2 and rows[0].subject_id == rows[1].subject_id
    assert rows[0].study_id != rows[1].study_id and rows[0].meta["dicom"]["ViewPosition"] == "PA"
    assert rows[0].meta["bits"] == 16 and read_info(tmp_path / "k1")["quarantine"]["total"] == 1
    logs = caplog.text + "".join(capsys.readouterr())
    blobs = list(_tree_bytes(tmp_path / "k1").values()) + [logs.encode()]
    for shard in (tmp_path / "k1" / "shards").glob("*.tar"):
        blobs += [m for m in pipeline_members(shard)]
    for needle in (name, pid, "Zyxwvut", "Quentin", "98765", "1.2.3.4.100"):
        assert not any(needle.encode() in b for b in blobs), needle
    res = prepare("folder", raw, tmp_path / "k2", key="secret-two", image_size=16, progress=False)
    assert res.rows == 2 and read_manifest(tmp_path / "k2")[0].subject_id != rows[0].subject_id
    with pytest.raises(ConfigError, match="subject-key"):
        prepare("folder", raw, tmp_path / "k2", key="secret-three", image_size=16, progress=False)


def pipeline_members(shard: Path) -> list[bytes]:
    with tarfile.open(shard) as tar:
        return [tar.extractfile(m).read() for m in tar if m.isfile()]


def test_bad_config_stops_with_clear_message(tmp_path, capsys):
    with pytest.raises(ConfigError, match="folder not found"):
        prepare("folder", tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown preparer 'mimic'.*mimic-cxr"):
        PREPARERS.get("mimic")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "labels.csv").write_text("file,report\na.png,x\n")
    with pytest.raises(DataError, match=r"labels.csv: missing required column\(s\) path .*--\*-col"):
        prepare(FolderPreparer(tmp_path / "raw", csv="labels.csv"), None, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="--csv other.csv: file not found"):
        FolderPreparer(tmp_path / "raw", csv="other.csv")
    assert main(["prepare", "folder", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "--root" in capsys.readouterr().err
    assert main(["prepare", "--list"]) == 0 and "mimic-cxr" in capsys.readouterr().out
    assert main(["prepare"]) == 2


def test_split_by_subject_is_stable_and_balanced():
    splits = [base.split_by_subject(f"s{i}") for i in range(3000)]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.8) < 0.03 and abs(share["test"] - 0.1) < 0.02
    assert base.split_by_subject("s7") == splits[7]
