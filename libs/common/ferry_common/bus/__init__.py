"""The message bus: one interface, an in-process broker and RabbitMQ behind it."""

from .interfaces import Bus, Delivery, Message, QueueSpec
from .topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, EXCHANGE

__all__ = [
    "Bus",
    "Delivery",
    "Message",
    "QueueSpec",
    "EXCHANGE",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
]
