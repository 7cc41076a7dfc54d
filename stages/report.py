"""Stage `report`: the run's HTML report (``RUN_DIR/report/report.html``), last in the graph.

The work is ``pipeline.reporting.report.write_report`` (also ``posttrain report RUN_DIR``); this module only
places it in the stage graph. It declares the final datasets as inputs so that it runs after the
online DPO stage (and after the eval stage when that is enabled), and reruns whenever they change.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pipeline.run.stage import Stage, StageContext


class ReportConfig(BaseModel):
    """The HTML report written at the end of a run."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    examples: int = Field(3, ge=0)
    """Example SFT records (highest tiers first) shown at the end of the report."""


def run(ctx: StageContext) -> None:
    from pipeline.reporting.report import write_report

    cfg: ReportConfig = ctx.config
    out = ctx.output_path("report") / "report.html"
    report = write_report(ctx.store.root, out, examples=cfg.examples)
    for line in report.summary_lines:
        ctx.log.info("%s", line)
    ctx.metrics.update({"plots": sum(s.png is not None for s in report.sections),
                        "sections_without_data": [s.key for s in report.sections if s.png is None]})


STAGE = Stage(name="report", inputs=("sft", "preferences", "online_pairs"), outputs=("report",),
              config_cls=ReportConfig, run=run, optional_inputs=("eval_results",))
