"""The run folder (docs/run-folder.md; docs/storage.md): its layout, the folders that hold it, the background
uploader, and the ``RunStore`` that the job writes through."""

from job.storage.folders import Folder, LocalFolder, RemoteFolder, StorageError, StoreRefused, is_remote, open_folder
from job.storage.layout import Layout
from job.storage.store import RunStore

__all__ = ["Folder", "Layout", "LocalFolder", "RemoteFolder", "RunStore", "StorageError", "StoreRefused", "is_remote", "open_folder"]
