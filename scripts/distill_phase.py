"""Phase `distill` of reproduce_scaling.py: each seed's Switch teacher into its dense twin.

Runs of one seed (its batches and init seed are the dense baseline's: the comparison is paired):
  distilled        student init from the teacher's non-expert weights + mixed loss (paper §4.2)
  init_only        (seed 0) init from the teacher, labels only      (Table 6, last row)
  distill_no_init  (seed 0) mixed loss from the student's own init   (Table 6, "Distillation")
"""

from __future__ import annotations

import os

import jax

from switch_jax.training import distill, steps


def _variants(args, seed: int) -> list[tuple[str, bool, float]]:
    """(name, init from teacher, soft weight)."""
    out = [("distilled", True, args.soft_weight)]
    if seed == 0 and not args.no_ablations:
        out += [("init_only", True, 0.0), ("distill_no_init", False, args.soft_weight)]
    return out


def run(args, trainer, train, val, results, flush, model_config, load_params, seed) -> None:
    part, opt = trainer.part, trainer.opt
    teacher_name = f"switch-{args.distill_experts}"
    teacher_cfg = part.adapt_model_config(model_config(args, args.distill_experts), args.batch_size)
    student_cfg = part.adapt_model_config(distill.dense_twin(teacher_cfg), args.batch_size)
    t_abstract = steps.abstract_train_state(teacher_cfg, opt, part)
    s_abstract = steps.abstract_train_state(student_cfg, opt, part)
    t_shardings = t_abstract.shardings.params

    def make(soft_weight):
        objective = distill.distill_objective(
            teacher_cfg, t_abstract.graphdef, soft_weight=soft_weight
        )
        return lambda: steps.make_train_step(
            student_cfg,
            opt,
            part,
            abstract=s_abstract,
            objective=objective,
            extra_shardings=(t_shardings,),
        )

    @jax.jit
    def initialise(student_params, teacher_params):
        return distill.init_from_teacher(student_params, teacher_params, student_cfg, teacher_cfg)[
            0
        ]

    path = os.path.join(args.out, "teachers", f"{teacher_name}-s{seed}.npz")
    if not os.path.exists(path):
        print(f"no teacher {path}: run --phases=scaling first; skipping seed {seed}")
        return
    teacher = load_params(path, t_abstract.state.params, part)
    for variant, from_teacher, soft_weight in _variants(args, seed):
        key = f"distill-{soft_weight}"
        trainer.compiled(key, student_cfg, make(soft_weight))
        state = trainer.init(key, seed)  # the dense baseline's init of this seed
        if from_teacher:
            with part.activate():
                state = state._replace(params=initialise(state.params, teacher))
        record, _ = trainer.run(
            f"{variant} s{seed}", key, state, train[seed], val, extra=(teacher,)
        )
        record.update(teacher=teacher_name, soft_weight=soft_weight, init_from_teacher=from_teacher)
        results["distill"].setdefault(variant, {})[str(seed)] = record
        flush()
