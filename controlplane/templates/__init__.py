"""Admin-owned templates rendered with typed user parameters (SPEC §5; format:
``templates/README.md``), versioned in the store and served over REST (SPEC §4).

A template is a YAML document: ``name``, ``kind`` (``dsn`` or ``job``), ``description``, typed
``parameters``, typed ``site`` values and a jinja2 ``body``. Users only ever choose parameter
values; admins write bodies and set site values (the site's Python, environment setup, MPI launch).

Defences, outermost first:

1. Parameter values are type-checked, bounded and checked against the policy before any rendering
   (``render.validate_params``); site values and the system values the control plane supplies are
   validated the same way (``render.validate_site``, ``system.validate_system``). No value may
   contain a newline or other control character.
2. Bodies are checked statically when a template is built (``grammar``): only output, ``if`` and
   non-nested ``for`` over ``params``/``site``/``system`` are allowed, every interpolation must end
   in ``| yaml`` (DSN) or ``| shquote`` (job), and no call, assignment, arithmetic, include, macro,
   unknown name, underscore or internal attribute may appear. A render bomb therefore cannot even
   be written.
3. Rendering runs in an ``ImmutableSandboxedEnvironment`` with ``StrictUndefined`` whose attribute
   and item access reads plain data only (mapping keys, list indexes, loop counters) (``sandbox``),
   under a time and output-size budget checked on every loop step and output chunk (``render``).
4. DSN output is re-read with a safe YAML loader (no aliases, no duplicate keys) and validated by
   ``common.config.parse_config``, the schema the gateway's own file uses; job output must be a
   ``#!`` script free of control characters.

Layout, each module importing only those before it: ``base`` (kinds, the strict model base,
field and body errors), ``parameters`` (declarations and per-type value checks), ``grammar`` (the
static body check), ``sandbox`` (the jinja2 environment and filters), ``loader`` (the ``Template``
model, parsing, locating errors in the file, the shipped directory), ``system`` (the control
plane's values), ``render`` (validation, the budgeted render, the save-time dry run),
``repository`` (the ``template_versions`` SQL) and ``api`` (the aiohttp handlers and ``ROUTES``).
All but ``loader``, ``repository`` and ``api`` are pure.
"""
