<#
.SYNOPSIS
    Point the Windows system proxy (WinINet, optionally WinHTTP) at llm-mitm, and put back
    exactly what was there before.

.EXAMPLE
    scripts/interception-win.ps1 start -Port 8080
    scripts/interception-win.ps1 status
    scripts/interception-win.ps1 stop

.NOTES
    start saves ProxyEnable, ProxyServer, ProxyOverride and AutoConfigURL (absent values
    included) once, and with -WinHttp the WinHTTP proxy as it was (the WinHttpSettings
    value, or its absence); starting twice keeps that first snapshot. stop restores it,
    byte for byte, and is harmless when nothing was started. WinINet is told through
    InternetSetOption (INTERNET_OPTION_SETTINGS_CHANGED = 39, then INTERNET_OPTION_REFRESH = 37).
    The snapshot is the file `python -m llm_mitm.sysproxy` keeps (~/.mitmproxy/llm-mitm-sysproxy.json),
    in its format: either tool stops what the other started.
#>
[CmdletBinding()]
param(
    [Parameter(Position = 0)]
    [ValidateSet('start', 'stop', 'status')]
    [string]$Action = 'status',

    [ValidateRange(1, 65535)]
    [int]$Port = 8080,

    [string]$ProxyHost = '127.0.0.1',

    [string]$Bypass = '<local>;localhost;127.*',

    [switch]$WinHttp
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$SettingsKey = 'HKCU:\Software\Microsoft\Windows\CurrentVersion\Internet Settings'
$ValueNames = @('ProxyEnable', 'ProxyServer', 'ProxyOverride', 'AutoConfigURL')
$WinHttpKey = 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Internet Settings\Connections'
$StateDir = Join-Path $HOME '.mitmproxy'
$StateFile = Join-Path $StateDir 'llm-mitm-sysproxy.json'

function Update-WinInet {
    if (-not ('LlmMitm.WinInet' -as [type])) {
        Add-Type -Namespace LlmMitm -Name WinInet -MemberDefinition @'
[DllImport("wininet.dll", SetLastError = true)]
public static extern bool InternetSetOption(IntPtr hInternet, int dwOption, IntPtr lpBuffer, int dwBufferLength);
'@
    }
    # 39: INTERNET_OPTION_SETTINGS_CHANGED, 37: INTERNET_OPTION_REFRESH
    [void][LlmMitm.WinInet]::InternetSetOption([IntPtr]::Zero, 39, [IntPtr]::Zero, 0)
    [void][LlmMitm.WinInet]::InternetSetOption([IntPtr]::Zero, 37, [IntPtr]::Zero, 0)
}

function Get-ProxyValues {
    $values = [ordered]@{}
    $item = Get-ItemProperty -Path $SettingsKey
    foreach ($name in $ValueNames) {
        if ($item.PSObject.Properties.Name -contains $name) {
            $values[$name] = $item.$name
        } else {
            $values[$name] = $null
        }
    }
    return $values
}

function Get-WinHttpSettings {
    # The WinHTTP proxy as netsh keeps it (binary), base64; $null when none is set.
    $item = Get-ItemProperty -Path $WinHttpKey -Name 'WinHttpSettings' -ErrorAction SilentlyContinue
    if ($null -eq $item) { return $null }
    return [Convert]::ToBase64String([byte[]]$item.WinHttpSettings)
}

function Save-ProxyValues {
    $saved = [ordered]@{
        backend  = 'windows'
        settings = Get-ProxyValues
    }
    if ($WinHttp) {
        $saved['winhttp'] = [ordered]@{ WinHttpSettings = Get-WinHttpSettings }
    }
    New-Item -ItemType Directory -Force -Path $StateDir | Out-Null
    $saved | ConvertTo-Json -Depth 4 | Set-Content -Path $StateFile -Encoding UTF8
}

function Add-WinHttpToSaved {
    # An earlier start (by either tool) saved no WinHTTP proxy: it is saved now, before the
    # import changes it, or stop would leave WinHTTP pointing at a proxy that is gone.
    $saved = Get-Content -Path $StateFile -Raw | ConvertFrom-Json
    if ($saved.PSObject.Properties.Name -contains 'winhttp') { return }
    $saved | Add-Member -NotePropertyName 'winhttp' -NotePropertyValue ([ordered]@{ WinHttpSettings = Get-WinHttpSettings })
    $saved | ConvertTo-Json -Depth 4 | Set-Content -Path $StateFile -Encoding UTF8
}

function Restore-WinHttpSettings($Encoded) {
    if ($null -eq $Encoded) {
        Remove-ItemProperty -Path $WinHttpKey -Name 'WinHttpSettings' -ErrorAction SilentlyContinue
    } else {
        Set-ItemProperty -Path $WinHttpKey -Name 'WinHttpSettings' -Value ([Convert]::FromBase64String($Encoded)) -Type Binary
    }
}

function Set-ProxyValue([string]$Name, $Value) {
    if ($null -eq $Value) {
        Remove-ItemProperty -Path $SettingsKey -Name $Name -ErrorAction SilentlyContinue
    } elseif ($Name -eq 'ProxyEnable') {
        Set-ItemProperty -Path $SettingsKey -Name $Name -Value ([int]$Value) -Type DWord
    } else {
        Set-ItemProperty -Path $SettingsKey -Name $Name -Value ([string]$Value) -Type String
    }
}

function Test-Administrator {
    $principal = [Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()
    return $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)
}

function Start-Interception {
    # netsh cannot write WinHTTP's (machine-wide) setting otherwise, and says so only in its
    # output: refused before anything changes, not reported on while WinHTTP goes direct.
    if ($WinHttp -and -not (Test-Administrator)) {
        throw 'llm-mitm: -WinHttp sets the machine''s WinHTTP proxy: run this from an administrator''s PowerShell (nothing was changed)'
    }
    $already = Test-Path $StateFile
    if (-not $already) {
        Save-ProxyValues
    } elseif ($WinHttp) {
        Add-WinHttpToSaved
    }
    Set-ProxyValue 'ProxyEnable' 1
    Set-ProxyValue 'ProxyServer' "${ProxyHost}:${Port}"
    Set-ProxyValue 'ProxyOverride' $Bypass
    # A PAC file would take precedence over the manual proxy; it comes back on stop.
    Set-ProxyValue 'AutoConfigURL' $null
    Update-WinInet
    if ($WinHttp) {
        $said = netsh winhttp import proxy source=ie
        if ($LASTEXITCODE -ne 0) {
            throw "llm-mitm: netsh winhttp import proxy failed: $said (WinINet is set; stop puts it back)"
        }
    }
    if ($already) {
        Write-Output "llm-mitm: system proxy already on; now ${ProxyHost}:${Port} (the settings saved at the first start are kept)"
    } else {
        Write-Output "llm-mitm: system proxy -> ${ProxyHost}:${Port} (bypass: $Bypass)"
    }
}

function Stop-Interception {
    if (-not (Test-Path $StateFile)) {
        Write-Output 'llm-mitm: not started; nothing to restore'
        return
    }
    $saved = Get-Content -Path $StateFile -Raw | ConvertFrom-Json
    if ($saved.backend -ne 'windows' -or $null -eq $saved.settings) {
        throw "llm-mitm: $StateFile holds no saved Windows proxy settings: set the proxy by hand, then delete that file"
    }
    foreach ($name in $ValueNames) {
        Set-ProxyValue $name $saved.settings.$name
    }
    Update-WinInet
    if ($saved.PSObject.Properties.Name -contains 'winhttp') {
        # Put back what was there (not a copy of the restored WinINet settings, which may differ)
        Restore-WinHttpSettings $saved.winhttp.WinHttpSettings
    }
    Remove-Item -Path $StateFile -Force
    Write-Output 'llm-mitm: system proxy restored'
}

function Show-Status {
    $state = if (Test-Path $StateFile) { 'on (started by llm-mitm)' } else { 'off (not started by llm-mitm)' }
    Write-Output "llm-mitm interception: $state"
    $values = Get-ProxyValues
    foreach ($name in $ValueNames) {
        $shown = if ($null -eq $values[$name]) { '(absent)' } else { $values[$name] }
        Write-Output ("  {0,-14} {1}" -f $name, $shown)
    }
}

switch ($Action) {
    'start' { Start-Interception }
    'stop' { Stop-Interception }
    'status' { Show-Status }
}
