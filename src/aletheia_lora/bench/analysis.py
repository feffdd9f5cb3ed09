"""What the figures say, computed from a result: curves read at a time or a loss, every arm against all-layer
LoRA (speedups, relative losses, time to quality), and the project's targets."""

from __future__ import annotations

import statistics

from aletheia_lora.bench.config import BASELINE, TARGET_ARM


def interpolate_time(points: list[tuple[float, float]], target: float) -> float | None:
    """First time a (time, loss) curve reaches ``target``, linear between points; None if it never does."""
    for i, (t, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return t
            t0, l0 = points[i - 1]
            return t0 + (l0 - target) / (l0 - loss) * (t - t0)
    return None


def interpolate_loss(points: list[tuple[float, float]], at: float) -> float:
    """Loss of a (time, loss) curve at time ``at``, linear between points."""
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= at <= t1:
            return l0 + (l1 - l0) * (at - t0) / (t1 - t0) if t1 > t0 else l1
    return points[-1][1]


def compare_arms(result: dict) -> None:
    """Add the ratios against the all-layer arm: speedups, relative losses, time to quality."""
    arms = {a["name"]: a for a in result["arms"]}
    base = arms[BASELINE]
    untimed, steps = result["config"]["untimed_steps"], result["config"]["max_steps"]
    goal, cap_seconds = result["quality"]["target_loss"], result["quality"]["cap_seconds"]
    base_times = base["step_seconds"][untimed:steps]
    base_forgetting = base["views"]["equal_steps"]["forgetting"]
    for arm in result["arms"]:
        times = arm["step_seconds"][untimed:steps]
        measured = base["median_step_seconds"] / arm["median_step_seconds"]
        arm["measured_speedup"] = measured
        # steps of the same index ran in the same round: their ratio cancels drift between rounds
        arm["paired_speedup"] = statistics.median(b / t for b, t in zip(base_times, times))
        arm["prediction_error"] = arm["predicted_speedup"] / measured - 1
        calibrated = arm.get("calibrated_speedup")  # absent from results written before calibration was recorded
        arm["calibrated_error"] = None if calibrated is None else calibrated / measured - 1
        for view in arm["views"].values():
            base_view = base["views"]["equal_steps"]
            view["target_vs_all"] = view["target_loss"] / base_view["target_loss"]
            view["forgetting_vs_all"] = None if view["forgetting"] is None else view["forgetting"] - base_forgetting
        reached = interpolate_time([(p["seconds"], p["loss"]) for p in arm["curve"]], goal)
        if reached is not None and reached > cap_seconds:
            reached = None
        arm["time_to_quality"] = {
            "seconds": reached,
            # against the time all-layer LoRA took to reach that loss: its equal-step training time
            "ratio_to_all": None if reached is None else reached / result["equal_time_seconds"],
            "trained_seconds": arm["curve"][-1]["seconds"],
        }


def assess_targets(result: dict) -> list[dict]:
    """The project's targets for the truncation-aware arm, each with its value and whether it was met (None: not
    measured, e.g. forgetting without a general corpus)."""
    arms = {a["name"]: a for a in result["arms"]}
    arm = arms.get(TARGET_ARM)
    if arm is None:
        return []
    base = arms[BASELINE]
    steps, time_view = arm["views"]["equal_steps"], arm["views"]["equal_time"]
    ttq = arm["time_to_quality"]["ratio_to_all"]
    forgetting, base_forgetting = steps["forgetting"], base["views"]["equal_steps"]["forgetting"]
    if forgetting is None or base_forgetting is None:  # --general-data none: not measured, neither met nor missed
        forgetting_target = ("not measured (no general corpus)", None)
    else:
        forgetting_target = (f"{forgetting:+.4f} vs {base_forgetting:+.4f} nats", forgetting <= base_forgetting)
    targets = [
        ("step time >= 1.30x faster than all-layer LoRA", f"{arm['measured_speedup']:.2f}x",
         arm["measured_speedup"] >= 1.30),
        ("predicted speedup within 10% of measured", f"{arm['predicted_speedup']:.2f}x predicted, "
         f"{arm['prediction_error']:+.1%}", abs(arm["prediction_error"]) <= 0.10),
        ("calibrated prediction within 5% of measured",
         "not calibrated" if arm.get("calibrated_error") is None
         else f"{arm['calibrated_speedup']:.2f}x predicted, {arm['calibrated_error']:+.1%}",
         None if arm.get("calibrated_error") is None else abs(arm["calibrated_error"]) <= 0.05),
        ("target eval loss within 2% of all-layer LoRA (equal steps)",
         f"{steps['target_loss']:.4f} vs {base['views']['equal_steps']['target_loss']:.4f} "
         f"({steps['target_vs_all'] - 1:+.2%})", steps["target_vs_all"] <= 1.02),
        ("forgetting no worse than all-layer LoRA (equal steps)", *forgetting_target),
        ("reaches all-layer LoRA's loss in <= 0.8x its time",
         "not reached" if ttq is None else f"{ttq:.2f}x", ttq is not None and ttq <= 0.8),
        ("equal-time target loss no worse than all-layer LoRA",
         f"{time_view['target_loss']:.4f} vs {base['views']['equal_time']['target_loss']:.4f}",
         time_view["target_loss"] <= base["views"]["equal_time"]["target_loss"]),
    ]  # fmt: skip
    return [{"target": t, "arm": TARGET_ARM, "value": v, "met": None if m is None else bool(m)} for t, v, m in targets]
