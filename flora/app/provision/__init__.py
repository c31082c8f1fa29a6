"""Provisioning a secured fleet: broker accounts, ACL entries, signing keys, client configs (`flora provision`)."""

from flora.app.provision.broker import acl_template, add_device_to_acl, password_hash, set_password
from flora.app.provision.workspace import (
    Provisioned,
    ProvisionSettings,
    check_device_id,
    provision_coordinator,
    provision_device,
)

__all__ = [
    "ProvisionSettings",
    "Provisioned",
    "acl_template",
    "add_device_to_acl",
    "check_device_id",
    "password_hash",
    "provision_coordinator",
    "provision_device",
    "set_password",
]
