"""IU X-ray (Indiana University / Open-i): NLMCXR PNG images + ecgen-radiology XML reports.

Layout (the two Open-i archives extracted side by side under ``--root``)::

    iu-xray/
      ecgen-radiology/1.xml 2.xml ... 4000.xml      (NLMCXR_reports.tgz)
      NLMCXR_png/CXR1_1_IM-0001-3001.png ...         (NLMCXR_png.tgz; a flat folder)

Each XML report (parsed by :func:`medvlp.data.iu.parse_report_xml`) lists its images as
``<parentImage id="CXR1_1_IM-0001-3001">``; the image is ``<id>.png`` anywhere under the image
folder. One record per image; the report's ``uId`` ("CXR1") is both subject and study (IU has
one study per de-identified patient). Labels: ``labels="mesh"`` (default) from the report's
human-coded ``<major>`` MeSH tags through the project's fixed mapping
(:func:`medvlp.data.iu.mesh_labels`, tags kept in ``meta.mesh``); ``"labeller"`` from the
report text. No official split: by subject hash. Views are not in the XML: with
``projections`` (the community ``indiana_projections.csv``: uid, filename, projection) each
image gets FRONTAL / LATERAL and ``views="frontal"`` keeps the frontal ones.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from medvlp.data.prepare import PREPARERS
from medvlp.data.prepare.base import Preparer, RawRecord, read_csv
from medvlp.errors import ConfigError

REPORT_DIRS = ("ecgen-radiology", "NLMCXR_reports/ecgen-radiology")
IMAGE_DIRS = ("NLMCXR_png", "images", "")


@PREPARERS.register("iu-xray", description="IU X-ray / Open-i: NLMCXR_png + ecgen-radiology XML reports")
class IUXrayPreparer(Preparer):
    name = "iu-xray"
    description = "IU X-ray (Open-i): PNG images, XML reports with MeSH tags"

    def __init__(self, root, labels: str = "mesh", projections: str | None = None, views: str = "all"):
        super().__init__(root, labels=labels, projections=projections, views=views)
        if labels not in ("mesh", "labeller"):
            raise ConfigError(f"--labels {labels!r}: use 'mesh' (the reports' coded MeSH tags) or 'labeller'")
        if views not in ("all", "frontal"):
            raise ConfigError(f"--views {views!r}: use 'all' or 'frontal'")
        if views == "frontal" and not projections:
            raise ConfigError("--views frontal needs --projections (IU reports do not say which image is frontal); "
                              "give the indiana_projections.csv file or keep --views all")
        self.reports = next((self.root / d for d in REPORT_DIRS if (self.root / d).is_dir()), None)
        if self.reports is None:
            raise ConfigError(f"--root {self.root}: no ecgen-radiology/ folder of XML reports; extract "
                              "NLMCXR_reports.tgz under --root (docs/data/iu-xray.md)")
        self.images = next(self.root / d for d in IMAGE_DIRS if (self.root / d).is_dir())
        self.projections = None
        if projections:
            path = Path(projections) if Path(projections).is_absolute() else self.root / projections
            if not path.is_file():
                raise ConfigError(f"--projections {projections}: file not found (looked at {path})")
            self.projections = {r["filename"].strip(): r["projection"].strip().upper()
                                for r in read_csv(path, ("filename", "projection"))}
        self.labels, self.views = labels, views
        self.stats: Counter = Counter()

    def records(self):
        from medvlp.data.iu import load_mesh_map, mesh_labels, parse_report_xml

        mapping = load_mesh_map() if self.labels == "mesh" else None
        by_name = {p.name: p.relative_to(self.root).as_posix() for p in self.images.rglob("*.png")}
        files = sorted(self.reports.glob("*.xml"), key=lambda p: (len(p.stem), p.stem))
        for path in files:
            rep = parse_report_xml(path.read_bytes(), path.name)
            self.stats["reports"] += 1
            if not rep.images:
                self.stats["reports_without_images"] += 1
            sections = {k: getattr(rep, k) for k in ("findings", "impression", "comparison", "indication")}
            labels = mesh_labels(rep.major, mapping) if mapping is not None else None
            for image_id in rep.images:
                name = f"{image_id}.png"
                view = (self.projections or {}).get(name, "")
                view = {"FRONTAL": "FRONTAL", "LATERAL": "LATERAL"}.get(view, view)
                if self.views == "frontal" and view != "FRONTAL":
                    self.stats["non_frontal_skipped"] += 1
                    continue
                rel = by_name.get(name, (self.images.relative_to(self.root) / name).as_posix())
                yield RawRecord(id=image_id, image=rel, subject_id=rep.id, study_id=rep.id, view=view,
                                sections=dict(sections), labels=dict(labels) if labels is not None else None,
                                meta={"report_id": rep.id, "mesh": rep.major, "report_file": path.name})

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--labels", choices=["mesh", "labeller"], default="mesh",
                            help="labels from the reports' MeSH tags (default) or the project's labeller")
        parser.add_argument("--projections", default=None,
                            help="CSV with filename,projection (Frontal/Lateral) per image, e.g. indiana_projections.csv")
        parser.add_argument("--views", choices=["all", "frontal"], default="all",
                            help="keep all images (default) or frontal ones (needs --projections)")

    @classmethod
    def options_from_args(cls, args):
        return {"labels": args.labels, "projections": args.projections, "views": args.views}
