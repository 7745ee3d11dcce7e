"""A tiny IU-style report archive built by the tests themselves (never IU text)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_iu_tgz(path: Path, reports, xml: str) -> Path:
    """Write ``NLMCXR_reports.tgz``-style XML reports ``(id, findings, impression, major tags)``
    formatted with ``xml`` (fields n, findings, impression, major) into ``path``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for n, findings, impression, major in reports:
            data = xml.format(n=n, findings=findings, impression=impression,
                              major="".join(f"<major>{m}</major>" for m in major)).encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{n}.xml")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path
