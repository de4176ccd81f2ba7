"""A GCS emulator for the URI tests: `python tests/gcs_emulator.py PORT BUCKET` (in memory).

gcp-storage-emulator, with one fix for fidelity: GCS sends an object's generation with its
contents (x-goog-generation), and tensorstore (orbax's array writer) conditions its next write
of that object on it; the emulator leaves the header out, which breaks a checkpoint written after
a restore.
"""

import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    obj = None
  if obj is not None:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])
  return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation  # Before the server module builds its routes.

from gcp_storage_emulator.server import create_server  # noqa: E402

if __name__ == "__main__":
  port, bucket = int(sys.argv[1]), sys.argv[2]
  create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
