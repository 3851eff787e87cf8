"""Durable log storage. :mod:`.base` is the interface; :mod:`.sqlite` the embedded default."""

from .base import CollectionTxn, EntryRecord, HubStore, ListingDetail, StoreError
from .sqlite import SqliteStore

__all__ = ["CollectionTxn", "EntryRecord", "HubStore", "ListingDetail", "SqliteStore", "StoreError"]
