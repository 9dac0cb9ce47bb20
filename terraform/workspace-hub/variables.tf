variable "project" {
  description = "Google Cloud project to deploy into."
  type        = string
}

variable "region" {
  description = "Region for the hub, its load balancer, Artifact Registry and Cloud Scheduler."
  type        = string
  default     = "europe-west1"
}

variable "zones" {
  description = "Zones the hub creates workspace VMs in (the first also runs the hub)."
  type        = list(string)
  default     = ["europe-west1-b"]
}

variable "hub_image" {
  description = "Container image of the hub (built from the repository's Dockerfile)."
  type        = string
}

variable "hub_machine_type" {
  description = "Machine type of the hub's instances."
  type        = string
  default     = "e2-small"
}

variable "hub_replicas" {
  description = "Number of hub instances behind the load balancer."
  type        = number
  default     = 1
}

variable "public_url" {
  description = "The hub's URL as browsers reach it (https://hub.example.com); the OIDC redirect goes to <public_url>/login/callback."
  type        = string
}

variable "preview_domain" {
  description = "Wildcard domain for port previews (<port>-<workspace>.<preview_domain>); point *.<preview_domain> at the load balancer."
  type        = string
}

variable "oidc_client_id" {
  description = "OAuth client id for browser sign-in (Google by default)."
  type        = string
}

variable "oidc_client_secret_id" {
  description = "Secret Manager secret holding the OAuth client secret."
  type        = string
}

variable "admins" {
  description = "Team-mode admins: subjects, or \"@example.com\" for a verified e-mail domain."
  type        = list(string)
  default     = []
}

variable "http_port" {
  description = "TCP port of the HTTP API and web UI."
  type        = number
  default     = 443
}

variable "quic_port" {
  description = "UDP port agents and the CLI dial."
  type        = number
  default     = 7443
}

variable "cleanup_schedule" {
  description = "Cron schedule of the idle clean-up (POST /cleanup)."
  type        = string
  default     = "*/5 * * * *"
}

variable "workspace_network" {
  description = "Network of the workspace VMs."
  type        = string
  default     = "default"
}

variable "generate_identity" {
  description = "Generate the hub's identity (CA, ticket and reset keys) into Secret Manager. The keys then sit in the terraform state too; set false to add the secret versions by hand (README, \"The hub's identity\")."
  type        = bool
  default     = true
}
