"""Code shared by the cloud and the device: data, evaluation protocol, bundle codec. No torch here."""
