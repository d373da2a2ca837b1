"""Phase `distill` of reproduce_scaling.py: each seed's Switch teacher into its dense twin.

Runs of one seed (its batches and init seed are the dense baseline's: the comparison is paired):
  distilled        student init from the teacher's non-expert weights + mixed loss (paper §4.2)
  init_only        (seed 0) init from the teacher, labels only      (Table 6, last row)
  distill_no_init  (seed 0) mixed loss from the student's own init   (Table 6, "Distillation")
"""

from __future__ import annotations

import os

from switch_jax.training import distill, steps


def _variants(args, seed: int) -> list[tuple[str, bool, float]]:
    """(name, init from teacher, soft weight)."""
    out = [("distilled", True, args.soft_weight)]
    if seed == 0 and not args.no_ablations:
        out += [("init_only", True, 0.0), ("distill_no_init", False, args.soft_weight)]
    return out


def run(args, trainer, train, val, results, flush, model_config, load_params, seed) -> None:
    todo = [v for v in _variants(args, seed) if str(seed) not in results["distill"].get(v[0], {})]
    if not todo:
        return  # finished in an earlier invocation
    part = trainer.part
    teacher_name = f"switch-{args.distill_experts}"
    teacher_cfg = part.adapt_model_config(model_config(args, args.distill_experts), args.batch_size)
    student_cfg = part.adapt_model_config(distill.dense_twin(teacher_cfg), args.batch_size)
    teacher = steps.abstract_params(teacher_cfg, part)
    path = os.path.join(args.out, "teachers", f"{teacher_name}-s{seed}.npz")
    if not os.path.exists(path):
        print(f"no teacher {path}: run --phases=scaling first; skipping seed {seed}")
        return
    teacher_params = load_params(path, teacher.params, part)
    for variant, from_teacher, soft_weight in todo:
        # The library's distillation objective with this seed's teacher (hence one setup per
        # seed); a fresh state is the dense baseline's init of the seed, then the teacher's
        # non-expert weights when `from_teacher`.
        objective = distill.distill_objective(
            teacher_cfg,
            teacher,
            soft_weight=soft_weight,
            load_teacher=lambda: teacher_params,
            student_cfg=student_cfg if from_teacher else None,
        )
        key = f"{variant} s{seed}"
        trainer.setup(key, student_cfg, objective)
        state = trainer.init(key, seed)
        record, _ = trainer.run(key, key, state, train[seed], val)
        record.update(teacher=teacher_name, soft_weight=soft_weight, init_from_teacher=from_teacher)
        results["distill"].setdefault(variant, {})[str(seed)] = record
        flush()
