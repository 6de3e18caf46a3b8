"""Write src/rolekd/report/paper.yaml from ../shared/paper/tables.yaml (run once; the output is committed)."""
import sys
from pathlib import Path
import yaml

src = Path(sys.argv[1]); dst = Path(sys.argv[2])
t = yaml.safe_load(src.read_text())
rows = []
def add(table, where, acc, **setting):
    rows.append({"table": table, "where": where, "acc": float(acc), **setting})

t1 = t["table1"]
for bits_key, accs in t1["rows"].items():
    bits = int(bits_key.split("/")[0])
    for m, acc in zip(t1["columns"], accs):
        add("Table 1", f"row {bits_key}, column {m}", acc, dataset="cifar100", model="resnet18", teacher="resnet18",
            bits=bits, row="stage_beta", method=m, lam=0.4 if m == "iikd" else 1.0, init="teacher")
t2 = t["table2"]
rowmap = {"vanilla": "vanilla", "stage_alpha": "stage_alpha", "only_iikd": "only_kd", "stage_beta": "stage_beta"}
for key, accs in t2["rows"].items():
    name, bits = key.split("/"); bits = int(bits)
    for col, acc in zip(t2["columns"], accs):
        model, dataset = col.split("/")
        s = dict(dataset=dataset, model=model, bits=bits, row=rowmap[name])
        if name in ("vanilla", "stage_alpha") and bits != 32:
            s["init"] = "scratch"  # the paper's low-bit vanilla / stage-alpha rows train DoReFa from scratch
        if name in ("only_iikd", "stage_beta"):
            s.update(method="iikd", teacher=model, lam=0.4, init="teacher")
        add("Table 2", f"row {key}, column {col}", acc, **s)
t3 = t["table3"]
for key, accs in t3["rows"].items():
    for col, acc in zip(t3["columns"], accs):
        model, m = col.split("/")
        add("Table 3", f"row {key}, column {col}", acc, dataset="cifar100", model=model, teacher=model, bits=4,
            row="student_teacher_schedule" if key == "teacher_schedule" else "stage_beta", method=m,
            lam=0.4 if m == "iikd" else 1.0, init="teacher")
t4 = t["table4"]
colmap = {"vanilla": "vanilla", "after_stage_alpha": "stage_alpha", "only_iikd": "only_kd",
          "after_stage_beta": "stage_beta"}
for key, accs in t4["rows"].items():
    teacher, student = [x.strip() for x in key.split("->")]
    for col, acc in zip(t4["columns"], accs):
        s = dict(dataset="cifar100", model=student, teacher=teacher, bits=32, row=colmap[col])
        if col in ("only_iikd", "after_stage_beta"):
            s.update(method="iikd", lam=0.4)
        add("Table 4", f"row {key}, column {col}", acc, **s)
for teacher, acc in t4["teachers"].items():
    add("Table 4", f"teacher {teacher} (caption)", acc, dataset="cifar100", model=teacher, bits=32, row="table4_teacher")

head = """# The paper's reported test accuracies (%), one entry per table cell, with the setting it was measured in.
# Generated from ../shared/paper/tables.yaml (Fu et al., "Role-Wise Data Augmentation for Knowledge
# Distillation", arXiv:2004.08861, Tables 1-4); sources and rules in docs/PAPER_NUMBERS.md.
# The report prints a number beside one of its cells only when every key of `setting` here equals the
# run's (dataset, model, bits, stage row, KD method, teacher model, λ, student initialisation) and the
# run used the paper's recipe length (epochs: 200). `row` is the stage's paper_row (rolekd.stages);
# student rows: vanilla = vanilla_student (from scratch), stage_alpha = student_alpha (A_T, no KD, from scratch).
"""
out = {"source": "Fu et al., Role-Wise Data Augmentation for Knowledge Distillation, arXiv:2004.08861, Tables 1-4 "
                 "(transcribed in ../shared/paper/tables.yaml)",
       "epochs": 200,
       "cells": [{"table": r.pop("table"), "where": r.pop("where"), "acc": r.pop("acc"), "setting": r} for r in rows]}
dst.write_text(head + yaml.safe_dump(out, sort_keys=False, width=120))
print(len(rows), "cells")
