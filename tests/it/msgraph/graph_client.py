"""Reads a fleetlaps orchestrator's Graph-compatible API with Microsoft's own msgraph-sdk.

The integration test `msgraph_sdk` runs it as a Graph client would use the SDK against
graph.microsoft.com, with only the base URL, the trusted CA and the token changed:

    python graph_client.py <api-url> <ca-file>

with, in the environment:

- MSGRAPH_TEST_TOKEN: a token holding Device.Read.All and DeviceLocalCredential.Read.All;
- MSGRAPH_TEST_READ_BASIC_TOKEN: a token holding DeviceLocalCredential.ReadBasic.All only;
- MSGRAPH_TEST_EXPECTED: JSON, {"devices": [{"id": …, "deviceName": …, "accountName": …}, …]},
  the enrolled devices (at least two, so that pages of one device make several pages).

It lists device local credentials (one page, then pages of one through the SDK's PageIterator,
then filtered by name), reads each device's credentials with `$select=credentials`, lists the
device directory (pages of one, following `odata_next_link` with `with_url`) and reads each
device, and checks the OData errors the SDK raises.
It prints what the SDK decoded as one JSON object on stdout, passwords included (the test
compares them with the device's account), and exits 1 at the first value that is missing or
differs from what was expected, naming the field on stderr and never printing a password.
"""

import asyncio
import base64
import binascii
import datetime
import json
import os
import ssl
import sys
import uuid
from urllib.parse import urlparse

import httpx
from azure.core.credentials import AccessToken
from kiota_abstractions.base_request_configuration import RequestConfiguration
from kiota_authentication_azure.azure_identity_authentication_provider import (
    AzureIdentityAuthenticationProvider,
)
from msgraph import GraphRequestAdapter, GraphServiceClient
from msgraph._version import VERSION as MSGRAPH_SDK_VERSION
from msgraph.generated.devices.devices_request_builder import DevicesRequestBuilder
from msgraph.generated.directory.device_local_credentials.device_local_credentials_request_builder import (
    DeviceLocalCredentialsRequestBuilder,
)
from msgraph.generated.directory.device_local_credentials.item.device_local_credential_info_item_request_builder import (
    DeviceLocalCredentialInfoItemRequestBuilder,
)
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph_core import GraphClientFactory
from msgraph_core.tasks.page_iterator import PageIterator


class Mismatch(Exception):
    """What the SDK decoded is missing or differs from what was expected; the message names the
    field and never holds a password."""


class StaticTokenCredential:
    """An azure-core `AsyncTokenCredential` holding one bearer token: what the SDK asks for a
    token, as it would ask azure-identity's credentials for an Entra ID one."""

    def __init__(self, token):
        self._token = token
        self.scopes_asked = set()

    async def get_token(self, *scopes, claims=None, tenant_id=None, enable_cae=False, **kwargs):
        self.scopes_asked.update(scopes)
        expires_on = int(datetime.datetime.now(datetime.timezone.utc).timestamp()) + 3600
        return AccessToken(self._token, expires_on)

    async def close(self):
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        pass


def expect(condition, what):
    if not condition:
        raise Mismatch(what)


def iso(value, what):
    expect(isinstance(value, datetime.datetime), f"{what} is missing or not a date-time")
    expect(value.tzinfo is not None, f"{what} has no time zone")
    return value.isoformat()


def graph_client(api_url, ca_file, token):
    """A GraphServiceClient as a Graph application builds one, pointed at the orchestrator:
    the azure-identity authentication provider allowed to send the token to its host only, the
    SDK's default middleware on an httpx client trusting only `ca_file`, and the base URL."""
    host = urlparse(api_url).hostname
    credential = StaticTokenCredential(token)
    auth_provider = AzureIdentityAuthenticationProvider(credential, allowed_hosts=[host])
    http_client = GraphClientFactory.create_with_default_middleware(
        client=httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_file))
    )
    adapter = GraphRequestAdapter(auth_provider, client=http_client)
    adapter.base_url = f"{api_url}/v1.0"
    return GraphServiceClient(request_adapter=adapter), adapter, credential


def decoded_password(credential, what):
    expect(credential.password_base64, f"{what}.passwordBase64 is missing")
    try:
        return base64.b64decode(credential.password_base64, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Mismatch(f"{what}.passwordBase64 is not the base64 of UTF-8 text") from None


async def odata_error(call, what):
    """The ODataError the SDK raises for `call`, as {status, code, message}."""
    try:
        await call
    except ODataError as err:
        expect(err.error is not None, f"{what}: the ODataError has no error object")
        return {
            "status": err.response_status_code,
            "code": err.error.code,
            "message": err.error.message,
        }
    raise Mismatch(f"{what}: the SDK raised no ODataError")


async def read_credentials(client, adapter, expected):
    expected_ids = [device["id"] for device in expected]
    names = {device["id"]: device["deviceName"] for device in expected}
    credentials_api = client.directory.device_local_credentials

    # One page: every device's metadata, no credentials.
    listed = await credentials_api.get()
    expect(listed is not None and listed.value is not None, "deviceLocalCredentials: value is missing")
    listed_ids = [info.id for info in listed.value]
    expect(listed_ids == sorted(expected_ids), "deviceLocalCredentials: the ids listed are not the enrolled devices'")
    expect(listed.odata_next_link is None, "deviceLocalCredentials: a next link on the only page")
    metadata = {}
    for info in listed.value:
        what = f"deviceLocalCredentials[{info.id}]"
        expect(info.device_name == names[info.id], f"{what}.deviceName is not the enrolled name")
        expect(info.credentials is None, f"{what}.credentials is listed without $select")
        metadata[info.id] = {
            "deviceName": info.device_name,
            "lastBackupDateTime": iso(info.last_backup_date_time, f"{what}.lastBackupDateTime"),
            "refreshDateTime": iso(info.refresh_date_time, f"{what}.refreshDateTime"),
        }

    # Pages of one device, through the SDK's PageIterator.
    query = DeviceLocalCredentialsRequestBuilder.DeviceLocalCredentialsRequestBuilderGetQueryParameters(top=1)
    first_page = await credentials_api.get(request_configuration=RequestConfiguration(query_parameters=query))
    expect(first_page is not None and len(first_page.value or []) == 1, "deviceLocalCredentials?$top=1: not one device")
    expect(first_page.odata_next_link, "deviceLocalCredentials?$top=1: no @odata.nextLink")
    paged_ids = []
    # The pages the iterator went through, each held so that none is mistaken for another.
    pages_seen = []
    iterator = PageIterator(first_page, adapter, error_mapping={"XXX": ODataError})

    def collect(info):
        paged_ids.append(info.id)
        if not pages_seen or pages_seen[-1] is not iterator.current_page:
            pages_seen.append(iterator.current_page)
        return True

    await iterator.iterate(collect)
    pages = len(pages_seen)
    expect(paged_ids == listed_ids, "deviceLocalCredentials pages: not every device once, in order")
    expect(pages == len(expected_ids), "deviceLocalCredentials pages: not one page per device")

    # Filtered by name.
    last = expected[-1]
    query = DeviceLocalCredentialsRequestBuilder.DeviceLocalCredentialsRequestBuilderGetQueryParameters(
        filter=f"deviceName eq '{last['deviceName']}'"
    )
    filtered = await credentials_api.get(request_configuration=RequestConfiguration(query_parameters=query))
    filtered_ids = [info.id for info in (filtered.value or [])] if filtered else []
    expect(filtered_ids == [last["id"]], "deviceLocalCredentials?$filter=deviceName eq …: not the one device")

    # One device with its credentials.
    credentials = {}
    for device in expected:
        query = DeviceLocalCredentialInfoItemRequestBuilder.DeviceLocalCredentialInfoItemRequestBuilderGetQueryParameters(
            select=["credentials"]
        )
        info = await credentials_api.by_device_local_credential_info_id(device["id"]).get(
            request_configuration=RequestConfiguration(query_parameters=query)
        )
        what = f"deviceLocalCredentials/{device['id']}"
        expect(info is not None and info.id == device["id"], f"{what}: id is not the device's")
        expect(info.device_name == device["deviceName"], f"{what}.deviceName is not the enrolled name")
        expect(info.credentials, f"{what}.credentials is missing or empty")
        entries = []
        for n, credential in enumerate(info.credentials):
            where = f"{what}.credentials[{n}]"
            expect(credential.account_name == device["accountName"], f"{where}.accountName is not the managed account")
            entries.append(
                {
                    "accountName": credential.account_name,
                    "accountSid": credential.account_sid,
                    "backupDateTime": iso(credential.backup_date_time, f"{where}.backupDateTime"),
                    "password": decoded_password(credential, where),
                }
            )
        backups = [entry["backupDateTime"] for entry in entries]
        expect(backups == sorted(backups, reverse=True), f"{what}.credentials are not newest first")
        credentials[device["id"]] = entries

    return {
        "ids": listed_ids,
        "metadata": metadata,
        "pagesOfOne": pages,
        "pagedIds": paged_ids,
        "filteredIds": filtered_ids,
        "credentials": credentials,
    }


async def read_devices(client, expected):
    expected_ids = sorted(device["id"] for device in expected)
    names = {device["id"]: device["deviceName"] for device in expected}

    # Pages of one device, following each page's odata_next_link with with_url.
    query = DevicesRequestBuilder.DevicesRequestBuilderGetQueryParameters(top=1)
    page = await client.devices.get(request_configuration=RequestConfiguration(query_parameters=query))
    paged_ids = []
    pages = 0
    while True:
        expect(page is not None and page.value is not None, "devices: value is missing")
        pages += 1
        paged_ids.extend(device.id for device in page.value)
        if not page.odata_next_link:
            break
        expect(pages < 100, "devices: more than 100 pages")
        page = await client.devices.with_url(page.odata_next_link).get()
    expect(paged_ids == expected_ids, "devices pages: the ids listed are not the enrolled devices'")
    expect(pages == len(expected_ids), "devices?$top=1: not one page per device")

    # Each device by id.
    devices = {}
    for device_id in expected_ids:
        device = await client.devices.by_device_id(device_id).get()
        what = f"devices/{device_id}"
        expect(device is not None and device.id == device_id, f"{what}: id is not the device's")
        expect(device.device_id == device_id, f"{what}.deviceId is not the device's id")
        expect(device.display_name == names[device_id], f"{what}.displayName is not the enrolled name")
        expect(device.operating_system == "Linux", f"{what}.operatingSystem is not Linux")
        devices[device_id] = {
            "displayName": device.display_name,
            "operatingSystem": device.operating_system,
            "approximateLastSignInDateTime": iso(
                device.approximate_last_sign_in_date_time, f"{what}.approximateLastSignInDateTime"
            ),
            "isSilent": device.additional_data.get("isSilent"),
        }
    return {"pagedIds": paged_ids, "pagesOfOne": pages, "devices": devices}


async def read_errors(client, read_basic_client, unauthenticated_client, device_id):
    unknown = str(uuid.uuid4())
    with_credentials = RequestConfiguration(
        query_parameters=DeviceLocalCredentialInfoItemRequestBuilder.DeviceLocalCredentialInfoItemRequestBuilderGetQueryParameters(
            select=["credentials"]
        )
    )
    return {
        "unknownCredentials": await odata_error(
            client.directory.device_local_credentials.by_device_local_credential_info_id(unknown).get(
                request_configuration=with_credentials
            ),
            "deviceLocalCredentials/<unknown id>",
        ),
        "unknownDevice": await odata_error(client.devices.by_device_id(unknown).get(), "devices/<unknown id>"),
        "credentialsWithReadBasic": await odata_error(
            read_basic_client.directory.device_local_credentials.by_device_local_credential_info_id(device_id).get(
                request_configuration=with_credentials
            ),
            "deviceLocalCredentials/<id>?$select=credentials with ReadBasic",
        ),
        "devicesWithReadBasic": await odata_error(read_basic_client.devices.get(), "devices with ReadBasic"),
        "unknownToken": await odata_error(
            unauthenticated_client.directory.device_local_credentials.get(), "deviceLocalCredentials with an unknown token"
        ),
    }


async def main(api_url, ca_file):
    expected = json.loads(os.environ["MSGRAPH_TEST_EXPECTED"])["devices"]
    expect(len(expected) >= 2, "MSGRAPH_TEST_EXPECTED: fewer than two devices, so no paging")
    client, adapter, credential = graph_client(api_url, ca_file, os.environ["MSGRAPH_TEST_TOKEN"])
    read_basic_client, _, _ = graph_client(api_url, ca_file, os.environ["MSGRAPH_TEST_READ_BASIC_TOKEN"])
    unauthenticated_client, _, _ = graph_client(api_url, ca_file, "not-a-token")

    result = {
        "sdkVersion": MSGRAPH_SDK_VERSION,
        "deviceLocalCredentials": await read_credentials(client, adapter, expected),
        "devices": await read_devices(client, expected),
        "errors": await read_errors(client, read_basic_client, unauthenticated_client, expected[0]["id"]),
    }
    expect(credential.scopes_asked, "the SDK never asked the credential for a token")
    result["scopesAsked"] = sorted(credential.scopes_asked)
    return result


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: graph_client.py <api-url> <ca-file>")
    try:
        print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
    except Mismatch as mismatch:
        sys.exit(f"msgraph-sdk: {mismatch}")
