"""The federation layer that the ClientApp (client/) and the ServerApp (server/) share.

- :mod:`payload`: the message format: record and key names, message types, wire dtypes;
- :mod:`replies`: a site's reply as plain data (:class:`~replies.Content`) and its
  validation against what the coordinator sent and knows of the site;
- :mod:`aggregate`: the aggregation math on named arrays (update norms, outliers,
  token rows averaged over the sites that used them).

Plain numpy and torch: Flower's records are converted at the edges (client/, server/).
"""
