"""The control plane: the REST service that keeps projects, tokens, templates, policies, sessions,
consumers and scan results, writes the audit log, launches consumer jobs and publishes the live
sessions to the gateways. It imports only ``common``."""
