"""Test helpers that ship with hf-sae: a local, protocol-level Hub for push/pull round trips without the internet.

* :class:`~hf_sae.testing.hub_server.PushServer` — the write side of the Hub API (create_repo, upload_folder,
  push_to_hub, branches, tags) in ~300 lines of stdlib ``http.server``, committing into plain git repositories.
* :class:`~hf_sae.testing.hub_server.LocalHub` — that server plus ``olah`` serving the same git repositories
  read-only to the unmodified ``huggingface_hub`` client (``from_pretrained``, ``snapshot_download``).
* :func:`~hf_sae.testing.tool_venvs.tool_python` — a cached venv per tool the tests drive (olah, the peer libraries
  sae-lens and eai-sparsify), created from the package registry on first use.
"""
