"""The control plane: the REST API (Ximilar recognition v2 compatible) and the work behind it.

Where things are::

    main.py            create_app(): services, middleware, routers, error handlers
    deps.py            typed dependencies (SessionDep, CurrentUser, TrainingDep, body_of(...), ...)
    settings.py        the one Settings object (TASKVISION_* variables)
    errors.py          exceptions -> JSON {"detail", "code"}; 405 with Allow
    auth.py            users and API tokens (stored hashed; rotate)
    cli.py             the `taskvision` command (serve, users, import-bundle, pipeline, config)
    routes/            HTTP only, one module per resource: tasks (and the review queue), labels,
                       training_images, models (predictions, report), training_runs, classify,
                       webhooks, account, health, docs (/docs, /redoc)
    schemas/           request and response models per resource (XCreate, XUpdate, XPublic)
    presenters.py      ORM rows -> public schemas
    http/              HTTP plumbing: slash-agnostic routing, bodies (JSON/form, strict),
                       query values, pages, the OpenAPI document, the URL guard
    services/          what routes call, no HTTP in it:
      container.py       every service of a process, built once (Services)
      training.py        the training queue (request, cancel)
      run_watcher.py     background job: start, follow and register training runs
      run_progress.py    a run's overall progress, time left, queue place
      evaluations.py     a version's per-image predictions and evaluation report
      review.py          the review queue: uncertain stored images, likely label errors
      webhooks.py        webhook endpoints, the delivery outbox and its dispatcher job
      versions.py        register_version() (runs and imports), import_bundle
      classifiers.py     classify's two backends: embedded predictors, the task's InferenceService
      serving_reconciler.py  background job (cluster): InferenceServices follow production versions
      inference_services.py  the Kubernetes calls for InferenceServices
      blob_gc.py         background job: deleted images' files, once nothing needs them
      background.py      the thread that runs the background jobs
      ingest.py          upload -> stored image (durability order in its docstring)
      snapshots.py       a task's data frozen into a dataset snapshot for a training
      task_labels.py     attaching/detaching labels to tasks
      lookups.py         fetch by id within the caller's workspace (404 / 400 rules)
      url_fetch.py       fetching image URLs (SSRF rules, one deadline, caps)
      signing.py         signed download links and their key
      rate_limits.py     per-token rates, per-workspace concurrency
    db/                ORM models (and status enums), engine/session, migrations runner
    migrations/        Alembic migrations

Blob keys (images/, datasets/, runs/, models/) are spelled out in taskvision/blob_layout.py.
"""
