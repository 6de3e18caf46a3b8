"""Every config shipped with rolekd (configs/**.yaml and the embedded quickstart) is valid end to end.

Loading validates the YAML; each pipeline stage's config is built as ``rolekd run`` builds it and checked as
a run checks it before its run directory is made; every stage's network is built (on the meta device: shapes
only, no memory) and every KD stage's objective is built from the stage's ``kd`` section with the teacher and
a probe batch, as the experiment layer builds it: for the methods that compare feature maps (KD-SVD, MHGD,
II-KD) a channel adapter exactly for the taps whose widths differ (the paper's Table 4), after which every
tap matches the teacher's width — the errors a user would otherwise meet hours into a run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rolekd.config import load_config
from rolekd.distill import build_kd_objective, distiller_class, list_distillers
from rolekd.distill.adapter import channels
from rolekd.distill.svd import check_taps
from rolekd.experiment import check_config
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


def _objective(kd, student, teacher):
    """The stage's KD objective (its method and options from ``kd``, a probe batch), set up on the meta device."""
    cls = distiller_class(kd.method)
    probe = torch.empty(2, 3, 32, 32, device="meta") if cls.needs_features else None
    obj = build_kd_objective(cls.from_config(kd), teacher, lam=kd.lam, lam_decay=kd.lam_decay,
                             lam_decay_every=kd.lam_decay_every, lam_milestones=kd.lam_milestones,
                             lam_gamma=kd.lam_gamma, clip=kd.clip, clip_e0=kd.clip_e0, clip_lam=kd.clip_lam,
                             probe=probe)
    obj.setup(student, torch.device("meta"))
    return obj


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
    for name, sc in stages.items():
        assert sc.out == str(tmp_path / name)
        check_config(sc, files=False)  # model, KD method and options, milestones: as a run checks them
        net = _net(sc.model.name, sc.model.kwargs, classes, sc.quant.w_bits, sc.quant.a_bits)
        method = sc.kd.method
        if method is None:
            continue
        assert method in list_distillers(), (name, method)
        teacher = _net(cfg.pipeline.teacher.model.name, cfg.pipeline.teacher.model.kwargs, classes)
        t_taps, s_taps = _taps(teacher), _taps(net)
        obj = _objective(sc.kd, net, teacher)
        try:
            if method in FEATURE_METHODS:
                # an adapter (C_teacher x C_student) exactly for the taps whose widths differ, none otherwise
                differ = sorted((channels(t_taps[k]), channels(s_taps[k])) for k in t_taps
                                if channels(t_taps[k]) != channels(s_taps[k]))
                assert sorted(tuple(p.shape) for p in obj.extra_parameters()) == differ, (name, method)
                check_taps(obj.distiller.adapter(s_taps), t_taps, method)  # UserError if a width still differs
        finally:
            obj.close()


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
    "table4.yaml": ("Table 4", [f"row wrn_28_10 -> wrn_16_2, column {c}" for c in
                                ("vanilla", "after_stage_alpha", "only_iikd", "after_stage_beta")]),
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
        setting = cell_setting(cfg, st, sc)
        for c in cells:
            if paper_number([c], paper["epochs"], setting):
                found.add(c["where"])
                # what the paper's definition of that row also fixes: the augmentation of a baseline, λ
                assert (sc.augment.cutout == 0) == (st.schedule is None), (d, "baselines: crop + flip only")
    assert found == set(wanted), sorted(set(wanted) - found)


# the paper's Table 4 pairs, as table4.yaml's header runs them (teacher, student)
TABLE4_PAIRS = [("wrn_28_10", "wrn_16_2"), ("wrn_28_10", "wrn_16_4"), ("wrn_28_10", "preresnet56"),
                ("preresnet164", "preresnet32"), ("pyramidnet_200_240", "preresnet44"),
                ("pyramidnet_200_240", "wrn_16_2")]


@pytest.mark.parametrize("teacher,student", TABLE4_PAIRS)
def test_table4_distils_every_pair_with_iikd_through_channel_adapters(teacher, student, tmp_path):
    cfg = load_config(ROOT / "configs" / "paper" / "table4.yaml",
                      [f"pipeline.teacher.model={teacher}", f"pipeline.student.model={student}"])
    stages = stage_configs(cfg, tmp_path)
    kd_stages = {d: sc for d, sc in stages.items() if sc.kd.method}
    assert set(kd_stages) == {"beta_search", "student", "only_kd"}
    assert {"vanilla_student", "student_alpha"} <= set(stages)
    t_net = _net(teacher, {}, 100)
    for d, sc in kd_stages.items():
        assert (sc.kd.method, sc.kd.lam, sc.quant.w_bits) == ("iikd", 0.4, 32), d
        s_net = _net(student, {}, 100)
        s_taps, t_taps = _taps(s_net), _taps(t_net)
        obj = _objective(sc.kd, s_net, t_net)
        try:
            widths = {k: (channels(t_taps[k]), channels(s_taps[k])) for k in t_taps}
            assert any(ct != cs for ct, cs in widths.values()), widths  # the pair really differs in width
            assert sorted(tuple(p.shape) for p in obj.extra_parameters()) == sorted(
                w for w in widths.values() if w[0] != w[1])
        finally:
            obj.close()


def test_a_report_before_any_stage_ran_gives_the_paper_numbers_of_the_stages_it_will_run(tmp_path):
    """Rows of stages that have not run take their setting from the stage config the pipeline will run."""
    import yaml as _yaml

    from rolekd.report import build_report
    from rolekd.report.report import PAPER_FILE

    cfg = load_config(ROOT / "configs" / "paper" / "table2_resnet18.yaml")
    (tmp_path / "config.yaml").write_text(_yaml.safe_dump(cfg.model_dump(mode="json")))
    report = build_report(tmp_path).read_text()
    paper = _yaml.safe_load(PAPER_FILE.read_text())
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| stage ")}
    for where, label in [("row stage_alpha/32, column resnet18/cifar100", "stage α (teacher schedule A_T)"),
                         ("row stage_beta/4, column resnet18/cifar100", "stage β (KD + student schedule A_S)")]:
        cell = next(c for c in paper["cells"] if c["table"] == "Table 2" and c["where"] == where)
        # the paper's number (stage β's is also Table 1's 4/4 II-KD cell, which the report may name instead)
        assert f"| {float(cell['acc']):.2f} (" in rows[label], (label, rows[label])
