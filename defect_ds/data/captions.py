"""Caption templates and defect tokens: one new token per defect type, e.g. scratch -> sks_scratch.

    python -c "from defect_ds.data.captions import caption_for as c; print(c('pill', 'crack', {'crack': 'sks_crack'}))"
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from defect_ds.data.sample import GOOD

DEFAULT_TOKEN_PREFIX = "sks_"
# {category}, {token} and {detail} (e.g. "vertical"; may be empty) are filled in per sample.
DEFAULT_TEMPLATE = "a photo of a {category} with {detail} {token}"
GOOD_TEMPLATE = "a photo of a {category}"


def defect_tokens(defect_types: list[str], prefix: str = DEFAULT_TOKEN_PREFIX,
                  overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Token per defect type (never for `good`): the prefix plus the type, unless overridden."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(defect_types))
    if unknown:
        raise ValueError(f"--token names defect type(s) {', '.join(unknown)} that the data does not have; "
                         f"known types: {', '.join(sorted(defect_types))}.")
    tokens = {t: overrides.get(t, prefix + re.sub(r"\W+", "_", t)) for t in sorted(defect_types) if t != GOOD}
    for t, token in tokens.items():
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"The token {token!r} for defect type {t} is invalid; use one word without spaces.")
    if len(set(tokens.values())) != len(tokens):
        raise ValueError(f"Two defect types share a token in {tokens}; give each type its own token.")
    return tokens


def parse_token_overrides(items: list[str] | None) -> dict[str, str]:
    """["scratch=sks_scr", ...] from the command line -> {"scratch": "sks_scr"}."""
    out = {}
    for item in items or []:
        name, sep, token = item.partition("=")
        if not sep or not name or not token:
            raise ValueError(f"--token {item!r} is invalid: write --token DEFECT_TYPE=TOKEN.")
        out[name] = token
    return out


def read_templates(path: str | Path | None) -> dict[str, str]:
    """A JSON file {defect_type: template}; the key "*" sets the default for unlisted types."""
    if not path:
        return {}
    path = Path(path)
    try:
        templates = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"Caption templates {path} cannot be read ({e}); give a JSON object "
                         "{defect_type: template}.") from None
    if not isinstance(templates, dict) or not all(isinstance(v, str) for v in templates.values()):
        raise ValueError(f"Caption templates {path} must be a JSON object of strings {{defect_type: template}}.")
    for name, template in templates.items():
        if name != GOOD and "{token}" not in template:
            raise ValueError(f"Caption template for {name} in {path} has no {{token}}; add it so the defect "
                             "token appears in the caption.")
    return templates


def caption_for(category: str, defect_type: str, tokens: dict[str, str],
                templates: dict[str, str] | None = None, detail: str = "") -> str:
    templates = templates or {}
    if defect_type == GOOD:
        template = templates.get(GOOD, GOOD_TEMPLATE)
        token = ""
    else:
        template = templates.get(defect_type, templates.get("*", DEFAULT_TEMPLATE))
        token = tokens[defect_type]
    detail = detail or ("a" if defect_type != GOOD else "")
    text = template.format(category=category.replace("_", " "), token=token, detail=detail,
                           defect_type=defect_type.replace("_", " "))
    return " ".join(text.split())
