"""The error of data a command cannot use, in a module of its own so that every reader of images on disk
(`flowmo_fast.formats.data`, `flowmo_fast.formats.image_shards`) raises the same type; commands end with its
one-line message (`flowmo_fast.flags.one_line_errors`, `train.start.in_processes`)."""

from __future__ import annotations


class DataError(ValueError):
    """Data a command cannot use (no image files, none that decode, a bad index); the message names the data
    and the fix."""


def nothing_decodes(description: str, tried: int) -> DataError:
    return DataError(
        f"none of the {tried} images tried of {description} decode: check that they are image files PIL can read "
        "(not truncated, not renamed other files), or point the command at another folder"
    )
