# Workspace Hub on Google Cloud: Firestore, Artifact Registry for workspace images, the hub's
# service account, the hub as a managed instance group behind a passthrough network load
# balancer (TCP for HTTP, UDP for QUIC), and a Cloud Scheduler job that calls POST /cleanup with an OIDC token.

locals {
  labels = { "workspace-hub" = "hub" }
  hub_config = templatefile("${path.module}/hub.toml.tftpl", {
    project        = var.project
    zones          = var.zones
    public_url     = var.public_url
    preview_domain = var.preview_domain
    http_port      = var.http_port
    quic_port      = var.quic_port
    agent_hub_addr = "${google_compute_address.hub.address}:${var.quic_port}"
    server_name    = trimprefix(trimprefix(var.public_url, "https://"), "http://")
    admins         = jsonencode(var.admins)
    client_id      = var.oidc_client_id
    image          = "projects/${var.project}/global/images/family/workspace-{tag}"
    network        = "global/networks/${var.workspace_network}"
    scheduler_sa   = google_service_account.scheduler.email
  })
}

resource "google_project_service" "apis" {
  for_each = toset([
    "compute.googleapis.com",
    "firestore.googleapis.com",
    "artifactregistry.googleapis.com",
    "cloudscheduler.googleapis.com",
    "secretmanager.googleapis.com",
  ])
  project            = var.project
  service            = each.value
  disable_on_destroy = false
}

resource "google_firestore_database" "hub" {
  project     = var.project
  name        = "(default)"
  location_id = var.region
  type        = "FIRESTORE_NATIVE"
  depends_on  = [google_project_service.apis]
}

# The audit log (GET /audit) is read newest first by id, filtered by workspace, by actor or
# by both: each filter needs a composite index (the emulator does not ask for them).
resource "google_firestore_index" "audit" {
  for_each = {
    workspace       = ["workspace_id"]
    actor           = ["actor"]
    workspace_actor = ["workspace_id", "actor"]
  }
  project    = var.project
  database   = google_firestore_database.hub.name
  collection = "audit"
  dynamic "fields" {
    for_each = each.value
    content {
      field_path = fields.value
      order      = "ASCENDING"
    }
  }
  fields {
    field_path = "id"
    order      = "DESCENDING"
  }
}

resource "google_artifact_registry_repository" "images" {
  project       = var.project
  location      = var.region
  repository_id = "workspace-hub"
  format        = "DOCKER"
  description   = "The hub's container image and workspace image artifacts."
  depends_on    = [google_project_service.apis]
}

# The hub: creates, suspends and deletes workspace VMs, reads and writes Firestore, pulls
# its image, reads its OAuth client secret and its identity. Nothing else.
resource "google_service_account" "hub" {
  project      = var.project
  account_id   = "workspace-hub"
  display_name = "Workspace Hub"
}

resource "google_project_iam_member" "hub" {
  for_each = toset([
    "roles/compute.instanceAdmin.v1", # insert, suspend, resume, delete instances
    "roles/datastore.user",           # Firestore documents
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
  ])
  project = var.project
  role    = each.value
  member  = "serviceAccount:${google_service_account.hub.email}"
}

resource "google_artifact_registry_repository_iam_member" "hub_pull" {
  project    = var.project
  location   = var.region
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.hub.email}"
}

# The hub's identity: one CA, ticket key and reset key for every replica and every instance
# that replaces one, in Secret Manager, readable by the hub's service account only. With
# generate_identity (the default) terraform makes them (the tls and random providers: the
# keys are then in the terraform state as well, so keep the state private); without it,
# add the versions by hand (README, "The hub's identity"). Rotating the CA: README,
# "Rotating the hub CA".
locals {
  identity_secrets = ["hub-ca-cert", "hub-ca-key", "hub-ticket-key", "hub-reset-key"]
}

resource "google_secret_manager_secret" "identity" {
  for_each  = toset(local.identity_secrets)
  project   = var.project
  secret_id = each.value
  labels    = local.labels
  replication {
    auto {}
  }
  depends_on = [google_project_service.apis]
}

resource "google_secret_manager_secret_iam_member" "identity" {
  for_each  = google_secret_manager_secret.identity
  project   = var.project
  secret_id = each.value.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.hub.email}"
}

resource "random_id" "ca" {
  count       = var.generate_identity ? 1 : 0
  byte_length = 6
}

resource "tls_private_key" "ca" {
  count       = var.generate_identity ? 1 : 0
  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_self_signed_cert" "ca" {
  count                 = var.generate_identity ? 1 : 0
  private_key_pem       = tls_private_key.ca[0].private_key_pem
  is_ca_certificate     = true
  validity_period_hours = 87600
  allowed_uses          = ["cert_signing", "crl_signing", "digital_signature"]
  subject {
    organization = "Workspace Hub"
    common_name  = "Workspace Hub CA ${random_id.ca[0].hex}"
  }
}

resource "random_bytes" "ticket_key" {
  count  = var.generate_identity ? 1 : 0
  length = 32
}

resource "random_bytes" "reset_key" {
  count  = var.generate_identity ? 1 : 0
  length = 32
}

resource "google_secret_manager_secret_version" "ca_cert" {
  count       = var.generate_identity ? 1 : 0
  secret      = google_secret_manager_secret.identity["hub-ca-cert"].id
  secret_data = tls_self_signed_cert.ca[0].cert_pem
}

resource "google_secret_manager_secret_version" "ca_key" {
  count       = var.generate_identity ? 1 : 0
  secret      = google_secret_manager_secret.identity["hub-ca-key"].id
  secret_data = tls_private_key.ca[0].private_key_pem_pkcs8
}

resource "google_secret_manager_secret_version" "ticket_key" {
  count       = var.generate_identity ? 1 : 0
  secret      = google_secret_manager_secret.identity["hub-ticket-key"].id
  secret_data = random_bytes.ticket_key[0].base64
}

resource "google_secret_manager_secret_version" "reset_key" {
  count       = var.generate_identity ? 1 : 0
  secret      = google_secret_manager_secret.identity["hub-reset-key"].id
  secret_data = random_bytes.reset_key[0].base64
}

data "google_secret_manager_secret_version" "oidc" {
  project = var.project
  secret  = var.oidc_client_secret_id
}

# Workspace VMs run with no service account: they reach the hub only over QUIC.

resource "google_compute_address" "hub" {
  project = var.project
  name    = "workspace-hub"
  region  = var.region
}

resource "google_compute_firewall" "hub" {
  project = var.project
  name    = "workspace-hub"
  network = var.workspace_network
  allow {
    protocol = "tcp"
    ports    = [tostring(var.http_port)]
  }
  allow {
    protocol = "udp"
    ports    = [tostring(var.quic_port)]
  }
  source_ranges = ["0.0.0.0/0"]
  target_tags   = ["workspace-hub"]
}

resource "google_compute_firewall" "health" {
  project       = var.project
  name          = "workspace-hub-health"
  network       = var.workspace_network
  source_ranges = ["35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22"]
  target_tags   = ["workspace-hub"]
  allow {
    protocol = "tcp"
    ports    = [tostring(var.http_port)]
  }
}

# Container-Optimized OS runs the hub's container; the config arrives as metadata.
data "google_compute_image" "cos" {
  family  = "cos-stable"
  project = "cos-cloud"
}

resource "google_compute_instance_template" "hub" {
  project      = var.project
  name_prefix  = "workspace-hub-"
  machine_type = var.hub_machine_type
  region       = var.region
  tags         = ["workspace-hub"]
  labels       = local.labels

  disk {
    source_image = data.google_compute_image.cos.self_link
    auto_delete  = true
    boot         = true
    disk_size_gb = 20
  }

  network_interface {
    network = var.workspace_network
    access_config {}
  }

  service_account {
    email  = google_service_account.hub.email
    scopes = ["cloud-platform"]
  }

  metadata = {
    "hub-config" = local.hub_config
    "gce-container-declaration" = yamlencode({
      spec = {
        containers = [{
          image = var.hub_image
          # Each replica is reached by the others at its internal address (peer_addr), so
          # that line is prepended per instance.
          command = ["/bin/sh", "-c", "md=http://metadata.google.internal/computeMetadata/v1/instance && ip=$(curl -fsS -H 'Metadata-Flavor: Google' $md/network-interfaces/0/ip) && { echo \"peer_addr = \\\"$ip:${var.quic_port}\\\"\"; curl -fsS -H 'Metadata-Flavor: Google' $md/attributes/hub-config; } > /tmp/hub.toml && exec workspace-hub serve --config /tmp/hub.toml"]
          env = [{
            name  = "WORKSPACE_HUB_OIDC_CLIENT_SECRET"
            value = data.google_secret_manager_secret_version.oidc.secret_data
          }]
        }]
        restartPolicy = "Always"
      }
    })
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "google_compute_health_check" "hub" {
  project = var.project
  name    = "workspace-hub"
  http_health_check {
    port         = var.http_port
    request_path = "/healthz"
  }
}

resource "google_compute_region_instance_group_manager" "hub" {
  project            = var.project
  name               = "workspace-hub"
  region             = var.region
  base_instance_name = "workspace-hub"
  target_size        = var.hub_replicas

  version {
    instance_template = google_compute_instance_template.hub.id
  }

  auto_healing_policies {
    health_check      = google_compute_health_check.hub.id
    initial_delay_sec = 120
  }
}

# A passthrough network load balancer: TCP and UDP reach the instances unchanged (QUIC
# needs UDP; Cloud Run and the HTTP(S) load balancers carry TCP only).
resource "google_compute_region_health_check" "hub" {
  project = var.project
  name    = "workspace-hub-lb"
  region  = var.region
  http_health_check {
    port         = var.http_port
    request_path = "/healthz"
  }
}

resource "google_compute_region_backend_service" "hub" {
  project               = var.project
  name                  = "workspace-hub"
  region                = var.region
  protocol              = "UNSPECIFIED"
  load_balancing_scheme = "EXTERNAL"
  health_checks         = [google_compute_region_health_check.hub.id]
  # Keep a client on one replica for the life of its QUIC connection.
  session_affinity = "CLIENT_IP"

  backend {
    group          = google_compute_region_instance_group_manager.hub.instance_group
    balancing_mode = "CONNECTION"
  }
}

resource "google_compute_forwarding_rule" "hub" {
  project               = var.project
  name                  = "workspace-hub"
  region                = var.region
  ip_address            = google_compute_address.hub.address
  ip_protocol           = "L3_DEFAULT"
  all_ports             = true
  load_balancing_scheme = "EXTERNAL"
  backend_service       = google_compute_region_backend_service.hub.id
}

# Cloud Scheduler calls POST /cleanup with an OIDC token of its own service account; the
# hub accepts exactly that account and audience ([cleanup_oidc] in hub.toml).
resource "google_service_account" "scheduler" {
  project      = var.project
  account_id   = "workspace-hub-scheduler"
  display_name = "Workspace Hub clean-up scheduler"
}

resource "google_cloud_scheduler_job" "cleanup" {
  project   = var.project
  name      = "workspace-hub-cleanup"
  region    = var.region
  schedule  = var.cleanup_schedule
  time_zone = "Etc/UTC"

  http_target {
    http_method = "POST"
    uri         = "${var.public_url}/cleanup"
    oidc_token {
      service_account_email = google_service_account.scheduler.email
      audience              = "${var.public_url}/cleanup"
    }
  }
  depends_on = [google_project_service.apis]
}
