"""Model card templates, one per architecture (`<model_type>.md`), rendered by `mom push` with Jinja2.

Each template receives the `ModelCardData` fields plus: `repo_id`, `config` (the model config as a dict),
`auto_class` (the Auto class that loads the checkpoint), `history` (markdown: how it was seeded and trained),
`results` (markdown table of the last step's evaluation) and `summarization` (that step's record, if it was
`mom summarize`: prompt format and decoding settings).
"""

from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent


def template_path(model_type: str) -> Path:
    return TEMPLATE_DIR / f"{model_type}.md"


def templates() -> list[str]:
    """The model types that have a template."""
    return sorted(path.stem for path in TEMPLATE_DIR.glob("*.md"))
