"""OpenPrompt's ManualTemplate syntax, parsed and rendered to token ids for a decoder-only model.

A template is plain text with ``{...}`` pieces: ``{"placeholder":"text_a"}``, ``{"mask"}``,
``{"meta":"name"}``, ``{"soft":"init words"}`` (trainable embeddings, one per token of the words; ``{"soft"}``
is one randomly initialised token), ``{"special":"<eos>"}``, with optional ``"shortenable"`` and
``"post_processing"`` keys. The answer is generated at ``{"mask"}``. Fixed text (and special tokens) may follow
the mask, as OpenPrompt allows (``question: {"placeholder":"text_a"} answer: {"mask"}.``): in teacher forcing it
would follow the target with no loss on it, which a decoder's causal attention makes a no-op, and when
answering the prompt ends at the mask, so it is parsed and checked but never tokenised (OpenPrompt's
LMTokenizerWrapper: "template words after <mask> ... we ignore"). An input (placeholder, meta, soft) after the
mask is refused, as OpenPrompt refuses it.
"""
from __future__ import annotations

import ast
import codecs
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from optqa.errors import OptqaError

KNOWN_KEYS = {"placeholder", "mask", "meta", "soft", "special", "text", "shortenable", "post_processing"}
POST_PROCESSING = {
    "lower": str.lower,
    "strip": str.strip,
    "capitalize": lambda s: s[:1].upper() + s[1:],
    "rstrip_period": lambda s: s.rstrip(". "),
}
# Soft positions carry the pad id in input_ids; their embeddings come from the template's own table.
SOFT_NONE = -1
# a long shortenable piece (a question far over max_seq_l) is tokenised from a head of this many characters per
# token wanted, doubled until it yields enough: plain English averages about 4 characters per BPE token
HEAD_CHARS_PER_TOKEN = 8
# tokens read past the limit before a head is trusted: the head's last word may tokenise differently than in the
# whole text, and these tokens are cut anyway
HEAD_SPARE_TOKENS = 8


@dataclass
class Piece:
    kind: str  # "text", "placeholder", "meta", "soft", "special", "mask"
    value: str | None = None
    shortenable: bool = False
    post_processing: str | None = None
    position: int = 0  # character offset in the template text, for error messages


def parse_template(text: str, source: str = "template", require_mask: bool = True) -> list[Piece]:
    """Split template text into pieces; a malformed ``{...}`` names the problem and its character position.

    ``require_mask=False`` parses text that is not a prompt (a GenerationVerbalizer's target rule).
    """
    pieces: list[Piece] = []
    i, plain = 0, []
    while i < len(text):
        char = text[i]
        if char != "{":
            if char == "}":
                raise OptqaError(f"{source}: unmatched '}}' at character {i}")
            plain.append(char)
            i += 1
            continue
        end, depth, in_string = i, 0, False
        while end < len(text):
            c = text[end]
            if c == '"' and text[end - 1] != "\\":
                in_string = not in_string
            elif not in_string and c == "{":
                depth += 1
            elif not in_string and c == "}":
                depth -= 1
                if depth == 0:
                    break
            end += 1
        if end >= len(text):
            raise OptqaError(f"{source}: unclosed '{{' at character {i}")
        if plain:
            pieces.append(Piece("text", "".join(plain), position=i - len(plain)))
            plain = []
        piece = _piece_from_dict(text[i:end + 1], i, source)
        piece.position = i
        pieces.append(piece)
        i = end + 1
    if plain:
        pieces.append(Piece("text", "".join(plain), position=len(text) - len(plain)))
    if require_mask:
        _check_structure(pieces, source)
    return pieces


def _piece_from_dict(raw: str, position: int, source: str) -> Piece:
    body = raw.strip()
    if body in ('{"mask"}', "{'mask'}"):
        return Piece("mask")
    if body in ('{"soft"}', "{'soft'}"):
        return Piece("soft", None)
    try:
        spec = json.loads(body)
    except json.JSONDecodeError:
        try:
            spec = ast.literal_eval(body)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # TypeError: {[1]: 2}
            raise OptqaError(f"{source}: cannot parse {raw!r} at character {position} "
                             f"(expected JSON like {{\"placeholder\":\"text_a\"}})") from None
    if isinstance(spec, set):  # {"mask"} written with other spacing
        spec = {key: None for key in spec}
    if not isinstance(spec, dict):
        raise OptqaError(f"{source}: {raw!r} at character {position} is not a dict")
    unknown = set(spec) - KNOWN_KEYS
    if unknown:
        raise OptqaError(f"{source}: unknown key {sorted(unknown, key=repr)[0]!r} at character {position} "
                         f"(known: {', '.join(sorted(KNOWN_KEYS))})")
    kinds = [k for k in ("placeholder", "mask", "meta", "soft", "special", "text") if k in spec]
    if len(kinds) != 1:
        raise OptqaError(f"{source}: {raw!r} at character {position} needs exactly one of "
                         "placeholder, mask, meta, soft, special, text")
    kind = kinds[0]
    value = spec[kind]
    post = spec.get("post_processing")
    if post is not None and post not in POST_PROCESSING:
        raise OptqaError(f"{source}: unknown post_processing {post!r} at character {position} "
                         f"(known: {', '.join(POST_PROCESSING)})")
    if kind == "placeholder" and value not in ("text_a", "text_b"):
        raise OptqaError(f"{source}: placeholder must be text_a or text_b, got {value!r} at character {position}")
    if kind in ("meta", "special") and not isinstance(value, str):
        raise OptqaError(f"{source}: {kind} needs a string at character {position}")
    # OpenPrompt makes input placeholders shortenable unless told otherwise
    shortenable = bool(spec.get("shortenable", kind in ("placeholder", "meta")))
    return Piece(kind, value if value is None else str(value), shortenable, post)


def _check_structure(pieces: list[Piece], source: str) -> None:
    masks = [i for i, p in enumerate(pieces) if p.kind == "mask"]
    if not masks:
        raise OptqaError(f"{source}: needs a {{\"mask\"}} at the end, where the answer is generated (found none)")
    if len(masks) > 1:
        raise OptqaError(f"{source}: a second {{\"mask\"}} at character {pieces[masks[1]].position}; "
                         "a template has exactly one")
    inputs_after = [p for p in pieces[masks[0] + 1:] if p.kind not in ("text", "special")]
    if inputs_after:
        raise OptqaError(f"{source}: {inputs_after[0].kind} at character {inputs_after[0].position} follows the "
                         f"{{\"mask\"}} at character {pieces[masks[0]].position}: a decoder generates the answer "
                         "after the prompt, so the inputs must come before the mask (fixed text may follow it)")


OPENPROMPT_PLACEHOLDERS = {"<text_a>": "text_a", "<text_b>": "text_b"}


def read_template_file(path: str | Path) -> str:
    """A template file's text: UTF-8, a byte-order mark dropped (Windows editors write one; it is no prompt
    text), line ends as written.

    Raises:
        OptqaError: the file is missing or not UTF-8 (naming the file and the byte).
    """
    path = Path(path)
    if not path.is_file():
        raise OptqaError(f"template file not found: {path}")
    data = path.read_bytes()
    try:
        return data.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OptqaError(f"{path}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); save the "
                         "template as UTF-8") from None


class ManualTemplate(nn.Module):
    """OpenPrompt's ManualTemplate: ``ManualTemplate(tokenizer, text=...)`` or ``ManualTemplate.from_file``.

    It is an ``nn.Module`` because ``{"soft"}`` pieces own trainable embeddings; those belong to the delta
    and are saved with it.
    """

    def __init__(self, tokenizer, text: str | None = None, placeholder_mapping: dict | None = None,
                 source: str = "template", embedding: nn.Embedding | None = None):
        super().__init__()
        if text is None:
            raise OptqaError("ManualTemplate needs text= (or use ManualTemplate.from_file)")
        self.tokenizer = tokenizer
        self.text = text.strip("\n")
        try:  # an undecodable byte of a command line (--template) arrives as a lone surrogate
            self.text.encode("utf-8")
        except UnicodeEncodeError as exc:
            shown = source.encode("utf-8", "backslashreplace").decode("utf-8")  # the source may be this text
            raise OptqaError(f"{shown}: character {exc.start} is not text ({self.text[exc.start]!r}, a lone "
                             "surrogate); write the template in UTF-8") from None
        if placeholder_mapping not in (None, OPENPROMPT_PLACEHOLDERS):
            # OpenPrompt's default maps <text_a>/<text_b> to the fields of the same name, which is what the
            # parser does; another mapping would be ignored, so it is refused
            raise OptqaError(f"{source}: placeholder_mapping {placeholder_mapping!r} is not supported; placeholders "
                             f"name InputExample fields directly (OpenPrompt's default {OPENPROMPT_PLACEHOLDERS})")
        self.pieces = parse_template(self.text, source)
        # an unknown special token would silently become <unk>: check them now, with the tokenizer at hand
        self._special_ids = {piece.value: tokenizer.convert_tokens_to_ids(
            self._special_token(piece.value, f"{source}: at character {piece.position}"))
            for piece in self.pieces if piece.kind == "special"}
        self._soft_token_ids: list[list[int]] = []
        for piece in self.pieces:
            if piece.kind == "soft":
                ids = self._encode(piece.value) if piece.value else [None]
                self._soft_token_ids.append(ids)
        self.num_soft_tokens = sum(len(ids) for ids in self._soft_token_ids)
        self.soft_embeds = None
        if self.num_soft_tokens:
            if embedding is None:
                raise OptqaError(f"{source}: {{\"soft\"}} pieces need the backbone's input embedding "
                                 "(pass embedding=plm.get_input_embeddings())")
            self.soft_embeds = nn.Parameter(self._initial_soft_embeds(embedding))

    @classmethod
    def from_file(cls, tokenizer, path: str | Path, embedding: nn.Embedding | None = None) -> "ManualTemplate":
        """A template read from a file (``read_template_file``); raises OptqaError naming the file when it is
        missing, not UTF-8 or malformed."""
        return cls(tokenizer, text=read_template_file(path), source=str(path), embedding=embedding)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_head(self, text: str, limit: int) -> list[int]:
        """The tokens of ``text``, or, where it is long, its first ``limit`` + ``HEAD_SPARE_TOKENS`` tokens,
        tokenising only a head of it.

        Heads of ``(limit + HEAD_SPARE_TOKENS) * HEAD_CHARS_PER_TOKEN`` characters, doubling, each ending before a
        whitespace run, so that every token before the end of the head is the token the whole text gives
        (pre-tokenizers split at whitespace; a word with no whitespace for thousands of characters is the
        exception): once a head yields more than ``limit`` + spare tokens, its first ``limit`` are the whole
        text's. The characters tokenised are at most about twice those the tokens kept stand for: linear in
        what is kept, whatever the text's length (tests/test_data.py counts them).
        """
        limit = max(limit, 0)
        chars = (limit + HEAD_SPARE_TOKENS) * HEAD_CHARS_PER_TOKEN
        while chars < len(text):
            # end the head before its last whitespace run (rsplit: linear, where a regex could backtrack)
            parts = text[:chars].rsplit(None, 1)
            ids = self._encode(parts[0] if len(parts) == 2 else text[:chars])
            if len(ids) > limit + HEAD_SPARE_TOKENS:
                return ids[:limit + HEAD_SPARE_TOKENS]
            chars *= 2
        return self._encode(text)

    def _initial_soft_embeds(self, embedding: nn.Embedding) -> torch.Tensor:
        # the embedding module's output, not its weight rows: the soft tokens replace that output, and Gemma's
        # embedding scales its rows by sqrt(hidden_size) inside the module
        generator = torch.Generator().manual_seed(0)
        ids = [int(torch.randint(4, embedding.num_embeddings, (1,), generator=generator)) if token_id is None
               else token_id for token_ids in self._soft_token_ids for token_id in token_ids]
        with torch.no_grad():
            return embedding(torch.tensor(ids, device=embedding.weight.device)).detach().float().clone()

    def _piece_texts(self, example):
        """``piece_texts`` of this template's pieces."""
        return piece_texts(self.pieces, example)

    def render(self, example, max_tokens: int | None = None) -> list[tuple[str, list[int], bool]]:
        """The prompt as ``(kind, token_ids, shortenable)`` segments, without bos and without the answer.

        Pieces are tokenised separately (so the question can be cut alone), with whitespace placed as
        ``_piece_texts`` says.

        Args:
            example: an ``InputExample``.
            max_tokens: the most tokens the prompt may keep; a shortenable piece then holds at most its first
                ``max_tokens`` (+ ``HEAD_SPARE_TOKENS``) tokens, read from a head of its text (``encode_head``),
                so a megabyte question costs what its kept tokens cost. None: every piece whole.
        """
        segments: list[tuple[str, list[int], bool]] = []
        soft_index = 0
        for piece, text in self._piece_texts(example):
            if piece.kind == "soft":
                start = sum(len(ids) for ids in self._soft_token_ids[:soft_index])
                count = len(self._soft_token_ids[soft_index])
                segments.append(("soft", list(range(start, start + count)), False))
                soft_index += 1
            elif piece.kind == "special":
                segments.append(("special", [self._special_ids[piece.value]], False))
            else:
                capped = piece.shortenable and max_tokens is not None
                segments.append((piece.kind, self.encode_head(text, max_tokens) if capped else self._encode(text),
                                 piece.shortenable))
        return segments

    def prompt_format(self) -> str:
        """The prompt as one format string, for tools that take text: ``{text_a}``/``{text_b}`` and ``{meta
        name}`` stand for the example's fields. The tokenizer's own bos (``add_special_tokens``) comes first,
        as in optqa's prompts; tokenised whole, the string gives the ids ``render`` gives (the whitespace
        rules above are what make the two agree).

        Raises:
            OptqaError: the template has ``{"soft"}`` pieces, which are embeddings, not text.
        """
        if self.num_soft_tokens:
            raise OptqaError('a template with {"soft"} pieces has no text form: its soft tokens are embeddings')
        fields = FieldNames()
        example = FieldNames(text_a="{text_a}", text_b="{text_b}", meta=fields, guid="template")
        parts = []
        for piece, text in self._piece_texts(example):
            if piece.kind in ("placeholder", "meta"):
                parts.append(text)  # "{text_a}": the one field str.format is to fill
            else:  # fixed text is text: braces in it are doubled, so str.format never reads them as fields
                text = self._special_token(piece.value) if piece.kind == "special" else text
                parts.append(text.replace("{", "{{").replace("}", "}}"))
        return "".join(parts)

    def _special_token(self, name: str, where: str = "template") -> str:
        aliases = {"<eos>": self.tokenizer.eos_token, "<bos>": self.tokenizer.bos_token,
                   "<pad>": self.tokenizer.pad_token, "<sep>": self.tokenizer.sep_token or self.tokenizer.eos_token}
        token = aliases.get(name, name)
        # convert_tokens_to_ids maps an unknown token to the unk id instead of failing
        if token is None or (token not in self.tokenizer.get_vocab()
                             and token not in self.tokenizer.all_special_tokens):
            known = sorted(set(aliases) | set(self.tokenizer.all_special_tokens))
            raise OptqaError(f"{where}: the tokenizer has no special token {name!r} (known: {', '.join(known)})")
        return token

    def _piece_text(self, piece: Piece, example) -> str:
        return piece_text(piece, example)


def piece_text(piece: Piece, example, what: str = "template") -> str:
    """The text a text, placeholder or meta piece stands for in ``example`` (post-processing applied)."""
    if piece.kind == "text":
        value = piece.value
    elif piece.kind == "placeholder":
        value = getattr(example, piece.value) or ""
    else:  # meta
        meta = example.meta or {}
        if piece.value not in meta:
            raise OptqaError(f"{what} asks for meta {piece.value!r}, example {example.guid} has "
                             f"{sorted(meta) or 'no meta'}")
        value = str(meta[piece.value])
    if piece.post_processing:
        value = POST_PROCESSING[piece.post_processing](value)
    return value


def piece_texts(pieces: list[Piece], example):
    """``(piece, text)`` for each piece before the mask; text is None for soft and special pieces. The one
    rendering of a prompt's text: the tokenised prompt (``ManualTemplate.render``), its format string
    (``prompt_format``) and the model card's preview (``optqa.sharing.card.prompt_preview``) all read it.

    Whitespace that ends one piece is moved to the start of the next, which is how byte-level BPE expects
    word boundaries; white space before a piece that is not text has no word to attach to (carrying both it
    and the space after it would give the next piece two leading spaces), and at the mask it is dropped.
    """
    carry = ""
    for piece in pieces:
        if piece.kind == "mask":
            break
        if piece.kind in ("soft", "special"):
            carry = ""
            yield piece, None
            continue
        text = carry + piece_text(piece, example)
        stripped = text.rstrip()
        carry = text[len(stripped):]
        if stripped:
            yield piece, stripped


class FieldNames(dict):
    """Stands in for an example (or its meta) when a template is shown as text: every field is ``{name}``."""

    def __init__(self, **fields):
        super().__init__()
        self.__dict__.update(fields)

    def __contains__(self, name) -> bool:
        return True

    def __bool__(self) -> bool:  # piece_text reads ``example.meta or {}``: an empty stand-in must not be replaced
        return True

    def __getitem__(self, name) -> str:
        return "{" + str(name) + "}"
