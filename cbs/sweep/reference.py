"""The config reference: every key of a sweep config, per back end, from the schema.

One source for ``python -m cbs.sweep --help`` and ``docs/config.md`` (so they cannot drift):
``python -m cbs.sweep.reference > docs/config.md`` regenerates the page, and a test checks
that the committed page equals :func:`config_markdown`.
"""

from __future__ import annotations

__all__ = ["config_reference", "config_markdown"]


def config_reference() -> str:
    """Every config key (type, default, doc), then each back end's section, metrics and
    optimizer kinds with their hyperparameter defaults: the text ``--help`` prints."""
    from cbs.sweep.backend import BACKENDS, get_backend
    from cbs.sweep.config import OptimizerEntry, Search, SearchRange, SweepConfig, TargetRule
    from cbs.sweep.schema import describe

    lines = ["config keys (YAML; any of them can be overridden as key.path=value):"]
    lines += describe(SweepConfig)
    lines.append(
        "  each entry of grid.optimizers (grid.optimizers.I.KEY=value on the command line):"
    )
    lines += describe(OptimizerEntry, prefix="grid.optimizers[i].")
    lines.append("  grid.search (and grid.optimizers[i].search), when set:")
    lines += describe(Search, prefix="grid.search.")
    lines.append(
        "  each range of grid.search.space (KEY: lr, <hyperparameter>, one_minus_<hyperparameter>):"
    )
    lines += describe(SearchRange, prefix="grid.search.space.KEY.")
    lines.append("  target.rule, when set:")
    lines += describe(TargetRule, prefix="target.rule.")
    lines += ["", "back ends, their sections, metrics and optimizer kinds:"]
    for name in BACKENDS:
        try:
            backend = get_backend(name)
        except Exception as e:  # noqa: BLE001 - a back end that cannot import leaves --help usable
            lines.append(f"  {name}: unavailable ({type(e).__name__}: {e})")
            continue
        lines.append(f"  backend {name!r}: section '{name}:'")
        lines += ["  " + line for line in describe(backend.Section, prefix=f"{name}.")]
        lines.append("    metrics: " + ", ".join(backend.metrics))
        for kind, spec in backend.optimizers.items():
            hps = (
                ", ".join(f"{k}={v.default:g}" for k, v in spec.hparams.items())
                or "no hyperparameters"
            )
            lines.append(f"    kind {kind}: {spec.doc} [{hps}]")
    return "\n".join(lines)


def config_markdown() -> str:
    """docs/config.md: :func:`config_reference` with a short preamble."""
    return "\n".join(
        [
            "# Config reference",
            "",
            "Generated from the schema by `python -m cbs.sweep.reference > docs/config.md`; the same",
            "text ends `python -m cbs.sweep --help`. Do not edit by hand: `tests/test_docs.py` checks",
            "that this page equals the generated text.",
            "",
            "A config is YAML; every key below can also be set on the command line as",
            "`key.path=value` (YAML value), list entries by index (`grid.optimizers.0.hparams.momentum=0.9`).",
            "Each line reads `key (type; bounds; default): what it is`. An integer key without an",
            "upper bound of its own must be of magnitude below 2^31 (steps, batch sizes, widths and",
            "counts are 32-bit integers on the device); a key given twice in one YAML mapping is an",
            "error naming both lines.",
            "",
            "```text",
            config_reference(),
            "```",
            "",
        ]
    )


if __name__ == "__main__":
    print(config_markdown(), end="")
