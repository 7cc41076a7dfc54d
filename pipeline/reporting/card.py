"""The dataset card (README.md with YAML metadata) of a published run, generated from the run.

The YAML block is built with the same ``datasets`` helpers that ``Dataset.push_to_hub`` uses
(``MetadataConfigs`` for ``configs:`` so that ``load_dataset(repo, name=...)`` finds each config,
``DatasetInfosDict`` for ``dataset_info:``) and rendered through ``huggingface_hub``'s
``DatasetCardData``. The body explains the run: pipeline config, models, seed sources and licences,
funnel counts, domain and tier distributions, every field, and how to reproduce it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.reporting.run_stats import RunSummary, stage_seconds

# Meaning of every field the pipeline writes (ARCHITECTURE.md, "Dataset names and record formats").
# Keys are column names; ``(config_kind, column)`` overrides a meaning for one kind of config.
FIELD_DOCS: dict[Any, str] = {
    "id": "Stable, content-derived id of the record (the same content always gets the same id).",
    "text": "Seed text: a chunk of the seed corpus that instructions were generated from.",
    "source_kind": "Kind of seed corpus the record descends from: `web`, `web_qa`, `code` or `book`.",
    "source": "Where the seed text comes from: file or dataset plus location (`path:line`, `#chunkN`).",
    "license": "Licence of the seed text, as declared by the seed source in the run config.",
    "n_tokens": "Length of the seed text in tokens of the run's tokenizer.",
    "title": "Title of the seed document (page title, file name or topic), when it has one.",
    "language": "Programming language of a code seed (None for prose).",
    "question": "For `web_qa` seeds: the question of the question/answer pair.",
    "answer": "For `web_qa` seeds: the answer of the question/answer pair.",
    "instruction": "The instruction (user prompt) as generated or evolved.",
    "instruction_id": "Id of the instruction (in the `evolved` dataset) this record answers.",
    "domain": "Domain label from the pipeline's taxonomy, assigned when the instruction was written.",
    "task_type": "Task type label of the instruction (e.g. explain, write code, rewrite).",
    "seed_id": "Lineage: id of the seed record the instruction was generated from.",
    "parent_id": "Lineage: id of the instruction this one was evolved from (None for generated ones).",
    "operator": "Lineage: evolution operator that produced the instruction: None (generated), `clarity` "
                "(clearer, more informative), `expand` (self-instruct augmentation of a low-resource "
                "domain) or `harder` (more demanding).",
    "round": "Lineage: evolution round that produced the instruction (0 for generated ones).",
    "model": "Lineage: model that wrote the instruction.",
    "responses": "Candidate answers, each {`text`, `model` (that answered), `finish_reason` (`stop`, or "
                 "`length` when cut at the token limit), `n_tokens`}.",
    "answer_model": "Lineage: the specialized model that wrote the answer (chosen per domain).",
    "messages": "The conversation in chat format: a `user` turn (the instruction) and an `assistant` turn "
                "(the answer), as TRL's SFTTrainer reads it.",
    "tier": "Quality tier from the critique model, 1-4 (4 best). Tiers drive coarse-to-fine SFT.",
    "scores": "Critique model's grades of the answer per criterion: accuracy, relevance, completeness, "
              "usefulness, clarity (higher is better).",
    "critique_reason": "The critique model's reasoning for the grades.",
    "agreement": "Self-consistency: fraction of independent answers that agree with this one, for objective "
                 "questions (None when the question is not objective).",
    "prompt": "TRL conversational preference format: the prompt as a list of messages.",
    "chosen": "The preferred response: a list with one assistant message.",
    "rejected": "The dispreferred response: a list with one assistant message.",
    "chosen_score": "Score of the chosen response (critique grade for offline pairs, reward-model score "
                    "for online pairs).",
    "rejected_score": "Score of the rejected response, on the same scale as `chosen_score`.",
    ("preferences", "source"): "How the pair was made: `critique` (offline, from critique grades of "
                               "several answers) or `online_round_k` (online DPO round k).",
    ("online", "source"): "The online DPO round that made the pair: `online_round_k`; chosen and rejected "
                          "are the best and worst of the policy's samples as scored by the reward model.",
}
UNDOCUMENTED = "(not documented by posttrain)"

CONFIG_DESCRIPTIONS = {
    "sft": "Instruction/response pairs that passed rule QC and the critique model, with quality tiers "
           "(SFT data, chat format).",
    "preferences": "Offline preference pairs built from critique grades (TRL conversational format).",
    "online": "Preference pairs of one online DPO round: the policy's samples scored by the reward model.",
    "seeds": "Seed corpus chunks the instructions were generated from.",
    "instructions": "Generated instructions, before evolution.",
    "evolved": "Instructions after evolution (surviving originals plus evolved ones).",
    "answers": "Instructions with all candidate answers, before filtering.",
}

_KNOWN_LICENCES = {"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0",
                   "cc-by-sa-4.0", "gpl-3.0", "lgpl-3.0", "unlicense"}
_SECRET_KEYS = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.I)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


def config_kind(name: str) -> str:
    """``online_dpo_round_2`` -> ``online``; other config names are their dataset's name."""
    return "online" if name.startswith("online_dpo") else name


def field_doc(config_name: str, column: str) -> str:
    return FIELD_DOCS.get((config_kind(config_name), column)) or FIELD_DOCS.get(column) or UNDOCUMENTED


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove tokens from text that leaves the machine: the given secrets and anything shaped like a
    Hugging Face token (``hf_...``)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return _HF_TOKEN.sub("<redacted>", text)


def redact_config(node: Any) -> Any:
    """Copy of a config with the values of secret-looking keys (token, password, api_key...) hidden."""
    if isinstance(node, dict):
        return {k: "<redacted>" if _SECRET_KEYS.search(str(k)) and v not in (None, "") else redact_config(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [redact_config(v) for v in node]
    return node


def feature_type(feature: Any) -> str:
    """Short readable type of a ``datasets`` feature: ``string``, ``list[struct{role, content}]``..."""
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype
    if isinstance(feature, datasets.List | datasets.LargeList):
        return f"list[{feature_type(feature.feature)}]"
    if isinstance(feature, dict):
        return "struct{" + ", ".join(feature) + "}"
    if isinstance(feature, list) and feature:
        return f"list[{feature_type(feature[0])}]"
    return type(feature).__name__


def hub_license(licences: Iterable[str]) -> tuple[str, str | None]:
    """(Hub ``license`` id, ``license_name`` for ``other``) for the set of seed licences."""
    names = sorted({str(x) for x in licences if x and str(x) != "unknown"})
    if len(names) == 1 and names[0].lower() in _KNOWN_LICENCES:
        return names[0].lower(), None
    if not names:
        return "other", "unknown"
    name = names[0].lower() if len(names) == 1 else "mixed-" + "-".join(n.lower() for n in names)
    return "other", re.sub(r"[^a-z0-9.-]+", "-", name)[:64]


def size_category(rows: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if rows < limit:
            return label
    return "n>10M"


@dataclass
class CardConfig:
    """One config of the published dataset, as the card describes it."""

    name: str
    rows: int
    features: Any
    num_bytes: int
    download_bytes: int
    data_dir: str
    default: bool = False


def card_metadata(configs: list[CardConfig], summary: RunSummary, pretty_name: str):
    """``DatasetCardData`` with licence, tags, ``configs:`` and ``dataset_info:``."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    licence, licence_name = hub_license(s["license"] for s in summary.seed_sources)
    extra = {"license_name": licence_name} if licence_name else {}
    data = DatasetCardData(
        license=licence, language=["en"], pretty_name=pretty_name,
        task_categories=["text-generation"],
        tags=["synthetic", "posttrain", "sft", "dpo", "preference", "mixture-of-experts"],
        size_categories=[size_category(sum(c.rows for c in configs))], **extra)
    infos, meta = {}, {}
    for c in configs:
        splits = SplitDict()
        splits.add(SplitInfo(name="train", num_bytes=c.num_bytes, num_examples=c.rows))
        infos[c.name] = DatasetInfo(config_name=c.name, features=c.features, splits=splits,
                                    download_size=c.download_bytes, dataset_size=c.num_bytes)
        meta[c.name] = {"data_files": [{"split": "train", "path": f"{c.data_dir}/train-*"}]}
        if c.default:
            meta[c.name]["default"] = True
    DatasetInfosDict(infos).to_dataset_card_data(data)
    MetadataConfigs(meta).to_dataset_card_data(data)
    return data


def _table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    # A markdown table is six lines; not worth a dependency (tabulate is not installed here).
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def render_card(configs: list[CardConfig], summary: RunSummary, repo_id: str, *,
                secrets: Iterable[str] = (), score_ranges: dict[str, tuple[float, float]] | None = None) -> str:
    """The README.md text: YAML metadata block, then the body. Secrets are redacted from all of it."""
    pretty = f"posttrain synthetic SFT and preference data ({repo_id.split('/')[-1]})"
    meta = card_metadata(configs, summary, pretty)
    out = [f"---\n{meta.to_yaml()}\n---", f"# {pretty}", ""]
    out.append(
        "Synthetic instruction data, SFT data with quality tiers and preference pairs (offline and online "
        "DPO rounds), made by a `posttrain` run: the post-training data recipe of "
        "Tencent's Hunyuan-Large (generate instructions from seed corpora, evolve them, answer with "
        "specialized models, filter with rule QC and a critique model, then iterative online DPO).")
    out += _configs_section(configs, repo_id)
    out += _provenance_section(summary)
    out += _quality_section(summary, score_ranges)
    out += _sources_section(summary)
    out += ["", "## Fields", ""]
    for c in configs:
        out += [f"### `{c.name}`", "", _table(["field", "type", "meaning"],
                                              [(f"`{col}`", feature_type(c.features[col]), field_doc(c.name, col))
                                               for col in c.features]), ""]
    out += _reproduce_section(summary, repo_id)
    return redact("\n".join(out), secrets)


def _configs_section(configs: list[CardConfig], repo_id: str) -> list[str]:
    default = next((c.name for c in configs if c.default), configs[0].name if configs else "sft")
    out = ["", "## Configs", "", _table(
        ["config", "rows", "contents"],
        [(f"`{c.name}`" + (" (default)" if c.default else ""), c.rows, CONFIG_DESCRIPTIONS.get(config_kind(c.name), ""))
         for c in configs])]
    return out + ["", "```python", "from datasets import load_dataset", "",
                  f'ds = load_dataset("{repo_id}", name="{default}", split="train")', "```"]


def _provenance_section(s: RunSummary) -> list[str]:
    out = ["", "## How the data was made", "", "Records per dataset, in pipeline order:", ""]
    if s.funnel:
        out.append(_table(["dataset", "stage", "records"], [(f.dataset, f.stage or "-", f.count) for f in s.funnel]))
    else:
        out.append("No dataset of the run was found.")
    if s.stages:
        out += ["", _table(["stage", "state", "wall time (s)"],
                           [(name, m.get("state", "-"), f"{t:.1f}" if (t := stage_seconds(m)) is not None else "-")
                            for name, m in s.stages.items()])]
    if s.drops:
        out += ["", "Records each stage dropped, per rule or reason:", "",
                _table(["stage", "reason", "records"],
                       [(stage, reason, n) for stage, drops in s.drops.items()
                        for reason, n in sorted(drops.items(), key=lambda kv: -kv[1])])]
    if s.online_rounds:
        out += ["", "Online DPO pairs per round:", "", _table(["round", "pairs"], s.online_rounds.items())]
    return out


def _quality_section(s: RunSummary, score_ranges: dict[str, tuple[float, float]] | None) -> list[str]:
    out = ["", "## Domains and quality tiers", ""]
    if s.domains:
        names = sorted(set().union(*[set(c) for c in s.domains.values()]))
        cols = list(s.domains)
        totals = {c: sum(s.domains[c].values()) for c in cols}
        out.append(_table(["domain", *[f"{c} (records)" for c in cols], *[f"{c} (share)" for c in cols]],
                          [(d, *[s.domains[c].get(d, 0) for c in cols],
                            *[_pct(s.domains[c].get(d, 0), totals[c]) for c in cols]) for d in names]))
    else:
        out.append("No domain labels in this run.")
    if s.tiers:
        total = sum(s.tiers.values())
        out += ["", "Quality tiers of the SFT set (critique model, 4 best):", "",
                _table(["tier", "records", "share"],
                       [(t, s.tiers[t], _pct(s.tiers[t], total)) for t in sorted(s.tiers)])]
    if score_ranges:
        out += ["", "Observed critique score ranges:", "",
                _table(["criterion", "min", "max"], [(k, lo, hi) for k, (lo, hi) in score_ranges.items()])]
    if s.operators:
        out += ["", "Evolution operators (instructions in `evolved`, and SFT rows that descend from them):", "",
                _table(["operator", "instructions", "in SFT", "yield"],
                       [(op, r["evolved"], r["in_sft"], _pct(r["in_sft"], r["evolved"]))
                        for op, r in s.operators.items()])]
    return out


def _sources_section(s: RunSummary) -> list[str]:
    out = ["", "## Seed sources and licences", ""]
    if s.seed_sources:
        shown = s.seed_sources[:40]
        out.append(_table(["kind", "origin", "licence", "records", "tokens"],
                          [(r["source_kind"], r["origin"], r["license"], r["records"], r["tokens"]) for r in shown]))
        if len(s.seed_sources) > len(shown):
            out.append(f"\n... and {len(s.seed_sources) - len(shown)} more origins.")
        out += ["", "The instructions and answers are model outputs derived from these seeds; the seed "
                    "licences apply to any seed text they quote, and the licences of the models below apply "
                    "to the generated text."]
    else:
        out.append("The run holds no seeds dataset, so the sources are unknown.")
    out += ["", "## Models", ""]
    out.append(_table(["role", "model(s)"], [(role, ", ".join(names)) for role, names in s.models.items()])
               if s.models else "No model is named in the run config or the records.")
    return out


def _reproduce_section(s: RunSummary, repo_id: str) -> list[str]:
    return ["## Pipeline config", "", "The resolved run config (`config.yaml` of the run directory):", "",
            "```yaml", yaml.safe_dump(redact_config(s.config), sort_keys=False).rstrip() or "{}", "```",
            "", "## Reproduce", "", "```bash",
            "# install posttrain (Python >= 3.11), then save the config above as config.yaml",
            "posttrain run config.yaml",
            f"posttrain publish RUN_DIR --repo-id {repo_id}",
            "```", "",
            "Record ids are content-derived and every generation request is seeded from the run seed and the "
            "record id, so a rerun with the same config, models and seed corpora reproduces the data.", "",
            "## Limitations", "",
            "All instructions, answers, critiques and scores are model outputs. Tiers and scores come from a "
            "critique model and online pair scores from a learned reward model; both can be wrong. Check the "
            "data before training production models on it.", ""]
