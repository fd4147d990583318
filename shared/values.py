"""`value` and `ordered_value`: dataclasses that are frozen to the type checker and
cheap to build at run time.

A `@dataclass(frozen=True)` sets each field in `__init__` through `object.__setattr__`:
2.1 µs to build a 17-field row against 0.3 µs for the same class unfrozen (timeit, on
the 2-core CI machine), and `dataclasses.replace` pays it again. The entitlements
worker builds tens of thousands of rows a second (docs/performance.md, issue 12), so its
rows are declared with these instead. mypy (over domain/, services/ and shared/) treats
them as frozen and rejects an assignment to a field; at run time nothing stops one, so
code that holds rows never assigns their fields (the diff of a batch compares rows by
identity first). They compare and hash by their fields, as frozen dataclasses do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def value(cls: type[T]) -> type[T]:
    """A slots dataclass with `__eq__` and `__hash__` over its fields; frozen for mypy."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


@dataclass_transform(frozen_default=True, order_default=True)
def ordered_value(cls: type[T]) -> type[T]:
    """A `value` that also orders by its fields, in declaration order."""
    return dataclass(slots=True, unsafe_hash=True, order=True)(cls)
