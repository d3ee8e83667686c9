"""A small sample file the demo completes in."""

from dataclasses import dataclass


@dataclass
class Item:
    name: str
    price: float
    quantity: int


def total_value(items: list[Item]) -> float:
    """Return the value of all items in stock."""
    return sum(item.price * item.quantity for item in items)


def most_valuable(items: list[Item]) -> Item:
    """Return the item whose stock is worth the most."""
    return max(items, key=lambda item: item.
