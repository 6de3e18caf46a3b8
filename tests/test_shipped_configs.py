"""Every config shipped with rolekd (configs/**.yaml and the embedded quickstart) is valid end to end.

Loading validates the YAML; each pipeline stage's config is built as ``rolekd run`` builds it; every
stage's network is built (on the meta device: shapes only, no memory) and, for the KD methods that
compare feature maps (KD-SVD, MHGD, II-KD), the student's and teacher's taps are checked for the equal
widths those methods need — the errors a user would otherwise meet hours into a run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rolekd.config import load_config
from rolekd.distill import list_distillers
from rolekd.distill.svd import check_taps
from rolekd.models import create
from rolekd.models.taps import FeatureTaps
from rolekd.pipeline.run import QUICKSTART, stage_configs
from rolekd.quant import quantize_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml")) + [Path(QUICKSTART)]
CLASSES = {"cifar100": 100}
FEATURE_METHODS = {"kdsvd", "mhgd", "iikd"}


def _net(name, kwargs, classes, w_bits=32, a_bits=32):
    with torch.device("meta"):
        model = create(name, num_classes=classes, **kwargs)
        return quantize_model(model, w_bits, a_bits) if (w_bits, a_bits) != (32, 32) else model


def _taps(model):
    with torch.device("meta"), torch.no_grad():
        taps = FeatureTaps(model.eval())
        try:
            return taps(torch.empty(2, 3, 32, 32)).features
        finally:
            taps.remove()


def test_the_shipped_configs_are_found():
    names = {p.name for p in SHIPPED}
    assert {"gpu-mini.yaml", "table1.yaml", "table4.yaml", "quickstart.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_config_builds_every_stage(path, tmp_path):
    cfg = load_config(path)
    classes = CLASSES.get(cfg.data.name, 10)
    if cfg.pipeline.student.method is None:  # a single-job config (rolekd train / distill)
        _net(cfg.model.name, cfg.model.kwargs, classes, cfg.quant.w_bits, cfg.quant.a_bits)
        assert cfg.kd.method is None or cfg.kd.method in list_distillers()
        return
    stages = stage_configs(cfg, tmp_path)
    assert {"alpha_search", "teacher", "beta_search", "student"} <= set(stages)
    teacher = _net(cfg.pipeline.teacher.model.name, cfg.pipeline.teacher.model.kwargs, classes)
    for name, sc in stages.items():
        assert sc.out == str(tmp_path / name)
        net = _net(sc.model.name, sc.model.kwargs, classes, sc.quant.w_bits, sc.quant.a_bits)
        method = sc.kd.method
        if method is None:
            continue
        assert method in list_distillers(), (name, method)
        if method in FEATURE_METHODS:
            check_taps(_taps(net), _taps(teacher), method)  # UserError if the widths differ


# each paper config, as shipped, reproduces these cells of its table (paper.yaml's `where`, the row and column
# the paper prints) -- every one must be matched by one of the config's stages, setting for setting
PAPER_ROWS = {
    "table1.yaml": ("Table 1", ["row 4/4, column iikd"]),
    "table2_resnet18.yaml": ("Table 2", [f"row {r}, column resnet18/cifar100" for r in
                                         ("vanilla/32", "stage_alpha/32", "vanilla/4", "stage_alpha/4", "only_iikd/4",
                                          "stage_beta/4")]),
    "table2_alexnet.yaml": ("Table 2", [f"row {r}, column alexnet/cifar100" for r in
                                        ("vanilla/32", "stage_alpha/32", "vanilla/4", "stage_alpha/4", "only_iikd/4",
                                         "stage_beta/4")]),
    "table3.yaml": ("Table 3", ["row teacher_schedule, column resnet18/iikd", "row student_schedule, column resnet18/iikd"]),
}


@pytest.mark.parametrize("name", sorted(PAPER_ROWS))
def test_paper_config_reproduces_its_tables_rows_as_the_paper_defines_them(name, tmp_path):
    import yaml as _yaml

    from rolekd.report.report import PAPER_FILE, cell_setting, paper_number
    from rolekd.stages import stage

    cfg = load_config(ROOT / "configs" / "paper" / name)
    table, wanted = PAPER_ROWS[name]
    paper = _yaml.safe_load(PAPER_FILE.read_text())
    cells = [c for c in paper["cells"] if c["table"] == table and c["where"] in wanted]
    assert len(cells) == len(wanted)
    found = set()
    for d, sc in stage_configs(cfg, tmp_path).items():
        st = stage(d)
        if st.kind != "train":
            continue
        setting = cell_setting(cfg, st, sc.model_dump(mode="json"))
        for c in cells:
            if paper_number([c], paper["epochs"], setting):
                found.add(c["where"])
                # what the paper's definition of that row also fixes: the augmentation of a baseline, λ
                assert (sc.augment.cutout == 0) == (st.schedule is None), (d, "baselines: crop + flip only")
    assert found == set(wanted), sorted(set(wanted) - found)
