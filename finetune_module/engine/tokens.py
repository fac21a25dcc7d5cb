"""Token ids: the padding token, compact token tables, length caps read off the data, and
truncation that keeps the tokens a model needs (the end-of-sequence token of a target, the end
of a prompt).

Tokenized data is held in arrays, not in Python lists of ints (which take about 36 bytes a
token): `TokenLists` keeps the ids of many texts in one flat int32 array with an offsets array
(4 bytes a token, 8 a text), and `TokenizedSet` pairs the inputs and labels of a set of
examples. Both are plain data: Hamilton's cache fingerprints them by their arrays' bytes and
stores them with pickle.
"""

import dataclasses
import itertools
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import overload

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label of a position left out of the loss (padding, a prompt)
#: The input cap of a model whose own limit is unknown (T5's relative positions have no table).
DEFAULT_INPUT_LIMIT = 512
ENCODING_CHUNK = 4_096  # texts tokenized at a time: no list of every text's ids is ever held
GATHER_CHUNK = 16_384  # lists copied at a time when taking or truncating (bounds temporaries)
CUTS = ("tail", "middle")  # how a list longer than its cap is cut (see `TokenLists.truncated`)


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer, padding with its end-of-sequence token when it has no padding token
    (GPT-2, Llama and most decoder-only tokenizers); padding is masked out everywhere."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclasses.dataclass(eq=False)
class TokenLists:
    """The token ids of many texts, in order: list `i` is `ids[offsets[i]:offsets[i + 1]]`.

    `len()` counts the lists; `token_lists[i]` is list `i` as an int32 array (a view, not a
    copy); iterating gives every list in order; `lengths()` is every list's length at once.
    """

    ids: np.ndarray  # int32: every list's ids, one list after another
    offsets: np.ndarray  # int64, one more than there are lists: where each list starts

    def __post_init__(self) -> None:
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int32)
        self.offsets = np.ascontiguousarray(self.offsets, dtype=np.int64)
        if (
            self.offsets.ndim != 1
            or len(self.offsets) < 1
            or self.offsets[0] != 0
            or self.offsets[-1] != len(self.ids)
            or not np.all(self.offsets[1:] >= self.offsets[:-1])
        ):
            raise ValueError("offsets must rise from 0 to the number of ids.")

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> "TokenLists":
        """The token lists of `lists` (Python lists of ints, or anything of that shape)."""
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        ids = np.fromiter(
            itertools.chain.from_iterable(lists), dtype=np.int32, count=int(lengths.sum())
        )
        return cls(ids, _offsets(lengths))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"token list {index} out of range ({n} lists)")
        i %= n
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.ids[start:end] for start, end in itertools.pairwise(self.offsets))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenLists):
            return NotImplemented
        return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.ids, other.ids)

    __hash__ = None  # type: ignore[assignment]  # mutable arrays: not hashable

    def __repr__(self) -> str:
        return f"TokenLists({len(self)} lists, {len(self.ids)} tokens)"

    @property
    def nbytes(self) -> int:
        """The bytes its arrays take."""
        return self.ids.nbytes + self.offsets.nbytes

    def lengths(self) -> np.ndarray:
        """Every list's length, as an int64 array."""
        return np.diff(self.offsets)

    def tolist(self) -> list[list[int]]:
        """Every list as a Python list of ints (for small sets and tests)."""
        return [ids.tolist() for ids in self]

    def take(
        self, rows: Sequence[int] | np.ndarray, cap: int | None = None, cut: str = "tail"
    ) -> "TokenLists":
        """The lists at the positions `rows`, in that order; with a `cap`, those longer than
        `cap` cut to `cap` tokens as `cut` says (see `truncated`), in the same single copy.

        Only the result is allocated in full: the ids are copied `GATHER_CHUNK` lists at a
        time, so that no per-token or per-list temporary of the whole set is ever held."""
        if cut not in CUTS:
            raise ValueError(f"cut must be one of {', '.join(CUTS)}; got {cut!r}.")
        if cap is not None and cap < 1:
            raise ValueError(f"cap must be at least 1 token; got {cap}.")
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and not (-len(self) <= rows.min() and rows.max() < len(self)):
            raise IndexError(f"rows out of range ({len(self)} lists)")
        if len(rows) and rows.min() < 0:
            rows = rows % len(self)
        chunks = [rows[first : first + GATHER_CHUNK] for first in range(0, len(rows), GATHER_CHUNK)]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        first = 0
        for chunk in chunks:  # the new lengths first, then their running total
            lengths = self.offsets[chunk + 1] - self.offsets[chunk]
            offsets[first + 1 : first + 1 + len(chunk)] = (
                lengths if cap is None else np.minimum(lengths, cap)
            )
            first += len(chunk)
        np.cumsum(offsets, out=offsets)
        ids = np.empty(offsets[-1], dtype=np.int32)
        first = 0
        for chunk in chunks:
            starts = self.offsets[chunk]
            lengths = self.offsets[chunk + 1] - starts
            head, tail = _kept(lengths, cap, cut)
            # each list is two segments, its head and its tail: starts and lengths interleaved
            segment_starts = np.stack([starts, starts + lengths - tail], axis=1).ravel()
            segment_lengths = np.stack([head, tail], axis=1).ravel()
            begin, end = offsets[first], offsets[first + len(chunk)]
            placed = np.cumsum(segment_lengths) - segment_lengths + begin  # where each one goes
            # where in self.ids each copied id comes from: its segment's start, counting up
            positions = np.arange(begin, end, dtype=np.int64)
            positions += np.repeat(segment_starts - placed, segment_lengths)
            ids[begin:end] = self.ids[positions]
            first += len(chunk)
        return TokenLists(ids, offsets)

    def truncated(self, cap: int, cut: str = "tail") -> "TokenLists":
        """Every list, those longer than `cap` cut to `cap` tokens: "tail" keeps the first
        `cap - 1` tokens and the last (`truncate_tail`), "middle" the first token and the last
        `cap - 1` (`truncate_middle`)."""
        return self.take(np.arange(len(self)), cap, cut)


def _kept(lengths: np.ndarray, cap: int | None, cut: str) -> tuple[np.ndarray, np.ndarray]:
    """How many of each list's first and last tokens are kept when lists of these lengths are
    cut to `cap` as `cut` says (all of them, as its head, when it is not longer than `cap`)."""
    if cap is None:
        return lengths, np.zeros_like(lengths)
    over = lengths > cap
    head = np.where(over, cap - 1 if cut == "tail" else 1, lengths)
    tail = np.where(over, 1 if cut == "tail" else cap - 1, 0)
    return head, tail


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """The offsets of lists of these lengths: 0, then their running total."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def encoded(
    texts: Sequence[str],
    encode: Callable[[list[str]], list[list[int]]],
    chunk_size: int = ENCODING_CHUNK,
) -> TokenLists:
    """The token ids of every text, in order, from `encode` (a list of texts -> their lists
    of ids, e.g. a call of the tokenizer), called on `chunk_size` texts at a time so that only
    one chunk's ids are ever held as Python lists. The ids go straight into one array, grown
    in place as needed (no chunk arrays kept to be joined at the end)."""
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)  # the lengths, then their running total
    ids = np.empty(0, dtype=np.int32)
    filled = 0
    for start in range(0, len(texts), chunk_size):
        lists = encode(list(texts[start : start + chunk_size]))
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        offsets[start + 1 : start + 1 + len(lists)] = lengths
        count = int(lengths.sum())
        if filled + count > len(ids):  # room for this chunk's and, at this rate, the rest's
            rate = (filled + count) / (start + len(lists))
            room = filled + count + int(rate * (len(texts) - start - len(lists))) + 1
            ids.resize(room, refcheck=False)  # in place; no view of `ids` is ever kept
        flat = itertools.chain.from_iterable(lists)
        ids[filled : filled + count] = np.fromiter(flat, dtype=np.int32, count=count)
        filled += count
    ids.resize(filled, refcheck=False)  # in place: the memory beyond is given back
    np.cumsum(offsets, out=offsets)
    return TokenLists(ids, offsets)


@dataclasses.dataclass(eq=False)
class TokenizedSet:
    """A set of examples, each an input (`input_ids`) and a target (`labels`), both not
    padded: a map-style dataset for the Trainer's DataLoader.

    `len()` counts the examples; `tokenized_set[i]` is example `i` as
    `{"input_ids": [...], "labels": [...]}` (Python lists, as the collators take them);
    a slice gives a list of such examples; iterating gives every example in order.
    """

    input_ids: TokenLists
    labels: TokenLists

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"{len(self.input_ids)} inputs but {len(self.labels)} labels; one each."
            )

    @classmethod
    def from_examples(cls, examples: Sequence[dict[str, Sequence[int]]]) -> "TokenizedSet":
        """The set of `examples`, each `{"input_ids": [...], "labels": [...]}`."""
        return cls(
            TokenLists.from_lists([e["input_ids"] for e in examples]),
            TokenLists.from_lists([e["labels"] for e in examples]),
        )

    def __len__(self) -> int:
        return len(self.input_ids)

    @overload
    def __getitem__(self, index: int) -> dict[str, list[int]]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, list[int]]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, list[int]] | list[dict[str, list[int]]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return {"input_ids": self.input_ids[index].tolist(), "labels": self.labels[index].tolist()}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for input_ids, labels in zip(self.input_ids, self.labels, strict=True):
            yield {"input_ids": input_ids.tolist(), "labels": labels.tolist()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenizedSet):
            return NotImplemented
        return self.input_ids == other.input_ids and self.labels == other.labels

    __hash__ = None  # type: ignore[assignment]  # mutable arrays: not hashable

    def __repr__(self) -> str:
        return f"TokenizedSet({len(self)} examples)"

    @property
    def nbytes(self) -> int:
        """The bytes its arrays take."""
        return self.input_ids.nbytes + self.labels.nbytes


def token_lengths(token_ids: TokenLists | Sequence[Sequence[int]]) -> np.ndarray:
    """The length of each token list, as an array (a `TokenLists`' without reading its ids)."""
    if isinstance(token_ids, TokenLists):
        return token_ids.lengths()
    return np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids))


def input_lengths(examples: "TokenizedSet | Sequence[Mapping[str, Sequence[int]]]") -> np.ndarray:
    """The length of each example's `input_ids`, as an array."""
    if isinstance(examples, TokenizedSet):
        return examples.input_ids.lengths()
    return token_lengths([example["input_ids"] for example in examples])


def length_cap(
    token_ids: TokenLists | Sequence[Sequence[int]], fixed: int | None, percentile: float
) -> int:
    """`fixed` if given, else the given percentile of the token lengths (rounded up, at
    least 2)."""
    if fixed is not None:
        return int(fixed)
    return max(2, int(np.ceil(np.percentile(token_lengths(token_ids), percentile))))


def truncate_tail(ids: list[int], cap: int) -> list[int]:
    """The first `cap` tokens, keeping the final (end-of-sequence) token last."""
    return ids if len(ids) <= cap else ids[: cap - 1] + ids[-1:]


def truncate_middle(ids: list[int], cap: int) -> list[int]:
    """The last `cap - 1` tokens after the first one: a prompt cut in its middle, keeping its
    first token (beginning-of-sequence, where there is one) and its end, next to the answer."""
    return ids if len(ids) <= cap else ids[:1] + ids[len(ids) - cap + 1 :]


def input_limit(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest input a model was made for, the cap of a model saved without its run's
    caps: the smaller of its position table and its tokenizer's model_max_length, else
    `DEFAULT_INPUT_LIMIT`."""
    limits = [
        value
        for name in ("max_position_embeddings", "n_positions", "max_source_positions")
        if isinstance(value := getattr(config, name, None), int) and value > 0
    ]
    if 0 < tokenizer.model_max_length < 1_000_000:  # "no limit" is a huge placeholder
        limits.append(int(tokenizer.model_max_length))
    return min(limits, default=DEFAULT_INPUT_LIMIT)


def right_padded_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Each row's length up to its last set (non-zero or True) position in a batch `mask`
    (rows x positions): what is left of it when its right padding is cut off."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device) * (mask != 0)
    return positions.amax(dim=1)


def prefix_lengths(mask: torch.Tensor) -> torch.Tensor | None:
    """Each row's count of leading ones in a right-padded batch `mask` (ones, or True, then
    zeros), or None when some row is not ones followed by zeros (left padding, or holes)."""
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    prefix = (positions[None, :] < lengths[:, None]).to(mask.dtype)
    return lengths if torch.equal(prefix, mask) else None


#: An encoder pass over one more group of questions costs about what reading this many more
#: padded tokens does (its dozens of small operations per layer), so `length_groups` joins
#: groups that would save fewer
GROUP_COST_TOKENS = 64


def length_groups(lengths: Sequence[int], group_cost: int = GROUP_COST_TOKENS) -> list[list[int]]:
    """The rows of a batch (by index) in groups of similar length, for the encoder to read one
    group at a time, each padded to its own longest row: the split of the rows, in order of
    length, that reads the fewest tokens, counting `group_cost` more for each group (the
    shortest rows first; rows of equal length keep their order)."""
    order = sorted(range(len(lengths)), key=lambda row: lengths[row])
    # cost[end]: the least cost of reading the `end` shortest rows; start[end]: where the
    # last group of that split starts
    cost, start = [0] * (len(order) + 1), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        cost[end], start[end] = min(
            (cost[first] + (end - first) * longest + group_cost, first) for first in range(end)
        )
    groups, end = [], len(order)
    while end:
        groups.append(order[start[end] : end])
        end = start[end]
    return groups[::-1]


def length_ranges(lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """`length_groups` of rows given in order of length, as ranges of rows with the longest
    length of each: (first row, the row after the last, longest). Empty where a group is not
    a range (the rows are not in order of length)."""
    ranges = []
    for rows in length_groups(lengths):
        if rows != list(range(rows[0], rows[0] + len(rows))):
            return []
        ranges.append((rows[0], rows[0] + len(rows), max(lengths[row] for row in rows)))
    return ranges
