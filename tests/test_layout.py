"""The package's structure and its ground: layering of imports, derived configs, the registry, the stage table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rolekd.config import KDConfig, derive, load_config
from rolekd.errors import UserError
from rolekd.registry import Registry
from rolekd.stages import BASELINES, STAGE_NAMES, STAGES

PKG = Path(__file__).resolve().parents[1] / "src" / "rolekd"
TOP = {"experiment", "pipeline", "report", "export", "cli", "schedule_cli"}  # the wiring layer and what sits on it
LOWER = ("data", "augment", "models", "quant", "distill", "train", "search")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute rolekd module imported, at module level?) of one source file."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    top_level = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "rolekd":
                out.append((name, id(node) in top_level))
    return out


def _files(sub: str | None = None):
    root = PKG / sub if sub else PKG
    return sorted(root.rglob("*.py"))


@pytest.mark.parametrize("sub", LOWER)
def test_lower_packages_never_import_the_wiring_layer(sub):
    bad = [(f.name, m) for f in _files(sub) for m, _ in _imports(f) if m.split(".")[1:2] and m.split(".")[1] in TOP]
    assert not bad, bad


def test_no_function_local_imports_of_rolekd_modules():
    # a function-local import of a rolekd module only ever served to dodge an import circle
    bad = [(str(f.relative_to(PKG)), m) for f in _files() for m, top in _imports(f) if not top]
    assert not bad, bad


def test_import_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    modules = {".".join(f.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): f
               for f in _files()}
    for mod, f in modules.items():
        deps = set()
        for name, _ in _imports(f):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != mod and not mod.startswith(name + "."):  # a package's own __init__ is its parent
                deps.add(name)
        graph[mod] = deps
    # rolekd.X/__init__ re-exports its submodules: collapse each package to one node first
    def node(m):
        parts = m.split(".")
        return ".".join(parts[:2])
    pg: dict[str, set[str]] = {}
    for m, deps in graph.items():
        pg.setdefault(node(m), set()).update(node(d) for d in deps if node(d) != node(m))
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
        if n in seen:
            return
        stack.append(n)
        for d in pg.get(n, ()):
            visit(d)
        stack.pop()
        seen.add(n)

    for n in pg:
        visit(n)


def test_every_planted_bug_still_finds_its_text_once():
    """tests/planted_bugs.yaml stays plantable as the code moves: each entry is complete, its id unique and the text
    it replaces occurs exactly once in its file (tools/planted_bugs.py's own check, without planting anything)."""
    import runpy
    tool = runpy.run_path(str(PKG.parents[1] / "tools" / "planted_bugs.py"), run_name="planted_bugs")
    try:
        bugs = tool["load"]()
    except SystemExit as e:
        pytest.fail(str(e))
    assert len(bugs) > 40


def test_derive_validates_merges_sections_and_replaces_whole_ones():
    cfg = load_config(None, ["kd.method=soft", "kd.lam=0.7", "train.lr=0.05"])
    d = derive(cfg, "test", train={"epochs": 3}, kd=KDConfig(), name="x")
    assert d.train.epochs == 3 and d.train.lr == 0.05  # merged into the section
    assert d.kd == KDConfig() and d.name == "x"  # replaced whole
    assert cfg.train.epochs == 200 and cfg.kd.method == "soft"  # the source is untouched
    with pytest.raises(UserError, match=r"^stage x: train.epochs: .*greater than 0"):
        derive(cfg, "stage x", train={"epochs": 0})
    with pytest.raises(UserError, match="unknown key quant.bits"):
        derive(cfg, "stage x", quant={"bits": 4})


def test_role_config_short_form_is_the_model_and_quant_sections():
    short = load_config(None, ["pipeline.student={model: wrn_16_2, model_kwargs: {dropout: 0.1}, w_bits: 2, "
                               "a_bits: 4, method: soft}"]).pipeline.student
    long = load_config(None, ["pipeline.student={model: {name: wrn_16_2, kwargs: {dropout: 0.1}}, "
                              "quant: {w_bits: 2, a_bits: 4}, method: soft}"]).pipeline.student
    assert short == long and short.model.name == "wrn_16_2" and short.quant.w_bits == 2
    with pytest.raises(UserError, match="w_bits=9 is not supported"):  # the quant section's own check
        load_config(None, ["pipeline.student.w_bits=9"])
    with pytest.raises(UserError, match="unknown baseline"):
        load_config(None, ["pipeline.baselines=[only_kd, nonsense]"])


def test_registry_lookup_normalises_and_explains_unknown_names():
    reg: Registry[int] = Registry("widget", lambda n: n.strip().lower().replace("-", ""), hint="(see docs)")
    reg.add("Alpha-One", 1)
    reg.add("beta", 2)
    assert reg.get(" ALPHAONE ") == 1 and reg.canonical("alpha-one") == "Alpha-One" and "beta" in reg
    with pytest.raises(ValueError):
        reg.add("beta", 3)
    with pytest.raises(UserError, match=r"unknown widget 'betta': did you mean beta\? choose one of Alpha-One, "
                                        r"beta \(see docs\)"):
        reg.get("betta")
    assert reg.remove("beta") == 2 and "beta" not in reg and reg.names() == ["Alpha-One"]


def test_kd_methods_read_their_own_options():
    from rolekd.distill import distiller_class

    assert distiller_class("KD-SVD").name == "kdsvd"  # the documented spelling
    soft = distiller_class("soft").from_config(KDConfig(method="soft", T=3.0))
    assert soft.T == 3.0
    mhgd = distiller_class("mhgd").from_config(KDConfig(method="mhgd", prepare_epochs=2, options={"heads": 2}))
    assert (mhgd.prepare_epochs, mhgd.num_heads) == (2, 2)
    with pytest.raises(UserError, match=r"KD method 'rkd' takes no option\(s\) heads"):
        distiller_class("rkd").from_config(KDConfig(method="rkd", options={"heads": 2}))


def test_stage_table_drives_the_pipeline_and_the_report(tmp_path):
    from rolekd.pipeline import stage_configs
    from rolekd.report.report import STUDENT_ROWS, TEACHER_ROWS

    cfg = load_config(None, ["pipeline.baselines=[only_kd]"])
    assert list(stage_configs(cfg, tmp_path)) == [s.name for s in STAGES if not s.baseline or s.name == "only_kd"]
    assert set(BASELINES) < set(STAGE_NAMES)
    rows = [r[0] for r in TEACHER_ROWS + STUDENT_ROWS]
    assert sorted(rows) == sorted(s.name for s in STAGES if s.kind == "train")
    # each role's main stage last, below its baselines
    assert TEACHER_ROWS[-1][0] == "teacher" and STUDENT_ROWS[-1][0] == "student"
