"""Prices per model and the cost of one call. Pure: the table is data, the sum is arithmetic.

The shipped table (`data/pricing.json`, dated) is overridden model by model by the
`pricing.models` section of the config. A snapshot resolves to its base by a real date
(or `-latest`, `-0`, or a version) at the end of its name: `gpt-4o-2024-08-06` -> `gpt-4o`,
`claude-sonnet-4-5-20250929` -> `claude-sonnet-4-5`, and so do Vertex AI's and Bedrock's
names of a model (`claude-sonnet-4-5@20250929`, `mistral-large@2407`,
`us.anthropic.claude-sonnet-4-5-20250929-v1:0`).
Nothing else is taken off: a `-preview` is a model of its own (`gpt-4-1106-preview` is
GPT-4 Turbo, not `gpt-4`), and a snapshot priced apart from its base is in the table under
its own name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from importlib import resources

from llm_mitm.config import ModelPrice
from llm_mitm.memo import Memo
from llm_mitm.usage import Usage

_YEAR, _MONTH, _DAY = r"20\d\d", r"(?:0[1-9]|1[0-2])", r"(?:0[1-9]|[12]\d|3[01])"
# What a name of a model carries beyond the name the table prices it by, taken off one at a time.
_TAKEN_OFF = tuple(re.compile(pattern) for pattern in (
    # Bedrock's vendor before a model, and a cross-region inference profile's geography
    # before that (`us.`, `eu.`, `apac.`, `global.`): us.anthropic.claude-sonnet-4-5-20250929-v1:0
    r"^(?:[a-z]+(?:-[a-z]+)?\.)?(?:anthropic|openai|meta|mistral|amazon|cohere|ai21|deepseek|qwen)\.",
    rf"-{_YEAR}-{_MONTH}-{_DAY}$",  # OpenAI snapshots: gpt-4o-2024-08-06
    rf"[-@]{_YEAR}{_MONTH}{_DAY}$",  # Anthropic snapshots: claude-sonnet-4-5-20250929, on Vertex AI claude-sonnet-4-5@20250929
    rf"@(?:00[1-9]|2\d{_MONTH})$",  # Vertex AI's versions of partners' models: jamba-1.5-large@001, mistral-large@2407
    rf"-{_MONTH}{_DAY}$",  # older OpenAI snapshots: gpt-4-0613
    rf"-2\d{_MONTH}$",  # year and month: mistral-large-2411
    r"-latest$",  # an alias of the newest snapshot
    r"(?<=\d)-0$",  # Anthropic's alias of a version's first snapshot: claude-sonnet-4-0
    r"-v\d+(?::\d+)?$",  # Bedrock-style versions
))

# Anthropic bills a 1-hour cache write at twice the input price (a 5-minute one at 1.25x)
_ONE_HOUR_WRITE_FACTOR = 2.0


@lru_cache(maxsize=1)
def shipped_table() -> tuple[str, dict[str, ModelPrice]]:
    """(as_of date, prices) of the table that ships with the package."""
    data = json.loads(resources.files("llm_mitm").joinpath("data/pricing.json").read_text())
    return data["as_of"], {name: ModelPrice.model_validate(price) for name, price in data["models"].items()}


def snapshot_bases(name: str) -> Iterator[str]:
    """`name`, then the names of the model it is a snapshot of, a suffix taken off at a time
    (`gpt-4o-2024-08-06` -> `gpt-4o`; `claude-sonnet-4-0` -> `claude-sonnet-4`), Bedrock's
    vendor first (`anthropic.claude-...`): the names a table prices and a denial reads."""
    seen = set()
    while name and name not in seen:
        yield name
        seen.add(name)
        name = next((shorter for part in _TAKEN_OFF if (shorter := part.sub("", name)) != name), name)


_AZURE_GPT_35 = "gpt-35-"


class PriceTable:
    def __init__(self, overrides: Mapping[str, ModelPrice] | None = None) -> None:
        self.as_of, shipped = shipped_table()
        self._configured = {name: _with_known_maximum(price, name, shipped) for name, price in
                            ((k.lower(), v) for k, v in (overrides or {}).items())}
        self.prices = {**shipped, **self._configured}
        self._resolved: Memo[str, str | None] = Memo(self._resolve)

    def resolve(self, model: str) -> str | None:
        """The table's name for a model: exact, else with snapshot suffixes taken off."""
        return self._resolved(model)

    def _resolve(self, model: str) -> str | None:
        name = model.lower().rpartition("/")[2]  # "openai/gpt-4o" on some compatible servers
        if name.startswith(_AZURE_GPT_35):  # Azure's name for GPT-3.5 (`gpt-35-turbo`, `gpt-35-turbo-16k`): no dot
            name = "gpt-3.5-" + name[len(_AZURE_GPT_35):]
        return next((shorter for shorter in snapshot_bases(name) if shorter in self.prices), None)

    def price(self, model: str | None) -> ModelPrice | None:
        name = self.resolve(model) if model else None
        return self.prices[name] if name else None

    def price_for(self, asked: str | None, answered: str | None) -> ModelPrice | None:
        """The price of a call: one configured for the name it asked for wins (an Azure
        deployment's: Azure answers `gpt-4` for a GPT-4 Turbo deployment), else the price of
        the model that answered, else of the one asked for."""
        if self._configured and asked is not None and (configured := self._configured.get(asked.lower())) is not None:
            return configured
        return self.price(answered or asked)

    def max_output_tokens(self, asked: str | None, answered: str | None) -> int | None:
        """The most the model of a call writes in one answer: as its price names it (the
        name asked for, as priced), else as the model that answered that name (an Azure
        deployment's) or the one asked for does."""
        for price in (self.price_for(asked, answered), self.price(answered), self.price(asked)):
            if price is not None and price.max_output_tokens is not None:
                return price.max_output_tokens
        return None


def _with_known_maximum(price: ModelPrice, name: str, shipped: Mapping[str, ModelPrice]) -> ModelPrice:
    """A configured price keeps the output maximum of the shipped model its name resolves
    to (`gpt-4o-2024-08-06` to `gpt-4o`) where it names none: a price is what a config
    changes, the model's maximum is the model's."""
    if price.max_output_tokens is not None:
        return price
    known = next((shipped[base].max_output_tokens for base in snapshot_bases(name.rpartition("/")[2]) if base in shipped), None)
    return price if known is None else price.model_copy(update={"max_output_tokens": known})


def cost_usd(usage: Usage, price: ModelPrice) -> float:
    """Input not served from cache at the input price (its audio at the audio price), cache
    reads and writes at theirs (1-hour writes apart: they cost more; without a breakdown
    every write is a 5-minute one), and output (reasoning included, as every provider bills
    it) at the output price (its audio at the audio price)."""
    cached = usage.cached_input_tokens or 0
    written = usage.cache_creation_input_tokens or 0
    written_1h = min(usage.cache_creation_1h_input_tokens or 0, written)
    fresh = max(0, (usage.input_tokens or 0) - cached - written)
    audio_in = min(usage.audio_input_tokens or 0, fresh)
    output = usage.output_tokens or 0
    audio_out = min(usage.audio_output_tokens or 0, output)
    cached_price = price.cached_input if price.cached_input is not None else price.input
    write_price = price.cache_write if price.cache_write is not None else price.input
    write_1h_price = price.cache_write_1h if price.cache_write_1h is not None else price.input * _ONE_HOUR_WRITE_FACTOR
    audio_in_price = price.audio_input if price.audio_input is not None else price.input
    audio_out_price = price.audio_output if price.audio_output is not None else price.output
    total = (
        (fresh - audio_in) * price.input
        + audio_in * audio_in_price
        + cached * cached_price
        + (written - written_1h) * write_price
        + written_1h * write_1h_price
        + (output - audio_out) * price.output
        + audio_out * audio_out_price
    )
    return round(total / 1_000_000, 10)
